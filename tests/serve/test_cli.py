"""The `elmo` console script: every command runs."""

from elmo_serve.cli import main


def test_head_demo_prints_a_table(capsys):
    assert main(["head-demo", "--labels", "40", "--dim", "32", "--batch", "16", "--steps", "30"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "|" in line]
    assert len(lines) == 5  # header + fp32, bf16 SR, fp8 SR, fp8 nearest
    p_at_1 = [float(line.split("|")[1]) for line in lines[1:]]
    assert all(0.0 <= p <= 100.0 for p in p_at_1)
    assert p_at_1[0] > 100.0 / 40, "the fp32 head must beat chance after 30 steps"
