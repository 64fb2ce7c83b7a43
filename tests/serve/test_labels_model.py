"""Live labels in the served model, without Ray: added labels answer their own title, retired ones are never
returned (predict, similar, every backend), retitled rows are rewritten, the head grows only when its spare rows run
out, and changes land between concurrent predictions."""

import threading

import pytest
import torch
from conftest import toy_model

from elmo_kernels.common import interpreting
from elmo_kernels.topk import reference_topk
from elmo_kernels.topk.inputs import resolve_fp8_dots
from elmo_serve.catalogue_log import Change
from elmo_serve.model import Query, ServingModel
from elmo_serve.scoring import Scorer, padded_rows, spare_rows

FP8 = torch.float8_e4m3fn


def live_toy(labels: int = 200, spare: int = 0) -> ServingModel:
    """The toy model (fp8 head at its titles' embeddings) with zero-shot rows made the same way."""
    m = toy_model(labels=labels)
    m.scorer = Scorer(m.scorer.weights, labels, "torch", spare=spare)
    m.zero_shot_rows = lambda titles: m.queries(list(titles)).to(FP8)
    return m


def add(uid, title):
    return Change("add", uid, title)


def top(m: ServingModel, text: str, k: int = 5, exclude=()) -> list[int]:
    return m.predict_batch([Query([text], k, list(exclude))])[0][0][0]


def reference(m: ServingModel, texts, k):
    """Top-k label ids over every live row of the head, by the plain full-logits reference."""
    dead = [i for i in range(m.num_labels) if i in m.retired]
    _, ids = reference_topk(m.queries(texts), m.scorer.weights, k, m.num_labels, [dead] * len(texts))
    return ids.tolist()


def test_an_added_label_answers_its_own_title_first_and_gets_its_zero_shot_row():
    m = live_toy(spare=64)
    weights, capacity = m.scorer.weights, m.scorer.capacity
    titles = ["zstd : Zstandard fast real-time compression", "ripgrep : recursive line-oriented search tool"]
    ids = m.apply([add("zstd", titles[0]), add("ripgrep", titles[1])])
    assert ids == [200, 201] and m.num_labels == m.num_live == 202
    assert m.uids[200:] == ["zstd", "ripgrep"] and m.titles[200:] == titles and m.id_of("ripgrep") == 201
    assert m.scorer.weights is weights and m.scorer.capacity == capacity  # written in place, in spare rows
    assert torch.equal(weights[200:202].view(torch.uint8), m.zero_shot_rows(titles).view(torch.uint8))
    for i, t in zip(ids, titles, strict=True):
        assert top(m, t)[0] == i
    texts = titles + ["GNU C compiler", "python3 numpy"]
    assert [ids for ids, _ in m.predict_batch([Query(texts, 7)])[0]] == reference(m, texts, 7)


def test_a_retired_label_is_never_returned_by_predict_or_similar():
    m = live_toy(spare=16)
    target = m.id_of("gcc")
    assert top(m, m.titles[target])[0] == target
    m.similar_by_embedding(0, 5)  # the item index is built before the changes, then changed in place
    new = m.apply([add("clang", "clang : C, C++ and Objective-C compiler"), Change("retire", "gcc")])
    assert m.retired == {target} and m.num_live == 200 and m.num_labels == 201
    texts = [m.titles[target], "GNU C compiler gcc", "c compiler"]
    for text in texts:
        assert target not in top(m, text, 20)
    assert [ids for ids, _ in m.predict_batch([Query(texts, 20)])[0]] == reference(m, texts, 20)
    # k = every live label: all of them, the retired one still not among them; excluding it changes nothing
    ((ids, _),) = m.predict_batch([Query(["gcc"], 200)])[0]
    assert sorted(ids) == [i for i in range(201) if i != target]
    assert top(m, "gcc", 10, exclude=[target]) == top(m, "gcc", 10)
    for item in range(0, 201, 20):
        got, _ = m.similar_by_embedding(item, 200)
        assert target not in got and len(got) == 199 and (item == new[0] or new[0] in got)
    rows = torch.nn.functional.normalize(m.scorer.weights[:201].float(), dim=1)
    cos = rows @ rows[new[0]]
    cos[[new[0], target]] = -2
    assert m.similar_by_embedding(new[0], 5)[0] == cos.topk(5).indices.tolist()


def test_a_retitled_label_gets_its_new_title_row():
    m = live_toy()
    i = m.id_of("vim")
    title = "vim : a text editor for writing zig and rust programs quickly"
    assert m.apply([Change("update", "vim", title)]) == [i]
    assert m.titles[i] == title and m.num_labels == 200
    assert torch.equal(m.scorer.weights[i].view(torch.uint8), m.zero_shot_rows([title])[0].view(torch.uint8))
    assert top(m, title)[0] == i


def test_the_head_grows_only_when_its_spare_rows_run_out():
    m = live_toy(labels=40, spare=8)
    assert m.scorer.capacity == padded_rows(48)
    weights = m.scorer.weights
    m.apply([add(f"n{j}", f"new label number {j} zz{j}") for j in range(8)])
    assert m.scorer.weights is weights
    m.apply([add("more", "one more label beyond the spare rows")])  # the ninth: reallocated, bigger
    assert m.scorer.capacity == padded_rows(48 + spare_rows(48)) and m.scorer.weights is not weights
    assert m.num_labels == 49 and bool(m.scorer.dead[49:].all()) and not bool(m.scorer.dead[:49].any())
    assert torch.equal(m.scorer.weights[:48].view(torch.uint8), weights[:48].view(torch.uint8))
    texts = ["one more label beyond the spare rows", "new label number 3 zz3", "GNU C compiler"]
    assert [ids for ids, _ in m.predict_batch([Query(texts, 9)])[0]] == reference(m, texts, 9)
    assert top(m, texts[0])[0] == 48


def test_row_ids_mapping_grows_with_the_labels():
    m = live_toy(labels=60)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(3))
    w = m.scorer.weights.clone()
    w[perm] = m.scorer.weights[:60].clone()  # label i's row moves to perm[i]'s slot
    m = ServingModel(
        m.version, m.queries, Scorer(w, 60, "torch"), m.uids, m.titles, row_ids=perm, zero_shot_rows=m.zero_shot_rows
    )
    before = top(m, m.titles[7])
    (i,) = m.apply([add("fresh", "fresh : brand new label text qq")])
    assert i == 60 and int(m.row_ids[60]) == 60 and top(m, "fresh : brand new label text qq")[0] == 60
    m.apply([Change("retire", m.uids[before[0]])])
    assert before[0] not in top(m, m.titles[7], 30)


def test_changes_that_do_not_fit_change_nothing():
    m = live_toy()
    m.apply([Change("retire", "make")])
    for bad in (
        [add("gcc", "again")],
        [Change("update", "nope", "x")],
        [Change("update", "make", "back")],
        [Change("retire", "make")],
        [add("ok", "fine"), add("ok", "twice")],
    ):
        with pytest.raises(ValueError):
            m.apply(bad)
    assert m.num_labels == 200 and m.id_of("ok") is None and len(m.uids) == len(m.titles) == 200
    m.zero_shot_rows = None
    with pytest.raises(ValueError, match="zero-shot"):
        m.apply([add("x", "y")])
    m.apply([Change("retire", "gcc")])  # a retirement needs no row


def test_faiss_backend_follows_the_changes():
    m = live_toy()
    f = ServingModel(
        m.version,
        m.queries,
        Scorer(m.scorer.weights.float(), 200, "faiss"),
        m.uids,
        m.titles,
        zero_shot_rows=lambda t: m.zero_shot_rows(t).float(),
    )
    changes = [
        add("zstd", "zstd : Zstandard fast real-time compression"),
        Change("retire", "gcc"),
        Change("update", "vim", "vim : editor of zig programs"),
    ]
    m.apply(changes)
    f.apply(changes)
    texts = ["zstd compression", "GNU C compiler", "editor of zig programs", "python3"]
    assert [ids for ids, _ in f.predict_batch([Query(texts, 10, [0])])[0]] == [
        ids for ids, _ in m.predict_batch([Query(texts, 10, [0])])[0]
    ]
    assert f.id_of("gcc") not in top(f, "GNU C compiler gcc", 30)


def test_changes_land_between_concurrent_predictions():
    m = live_toy(spare=32)
    errors, answers, stop = [], [], threading.Event()

    def predict():
        while not stop.is_set():
            try:
                ((ids, _),) = m.predict_batch([Query(["GNU C compiler gcc"], 10)])[0]
                answers.append(ids)
            except Exception as e:  # noqa: BLE001 - the test counts every failure
                errors.append(repr(e))

    threads = [threading.Thread(target=predict) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for j in range(40):
            m.apply([add(f"cc{j}", f"cc{j} : GNU C compiler gcc variant {j}")])
            if j % 4 == 3:
                m.apply([Change("retire", f"cc{j - 1}")])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors and len(answers) > 10
    assert all(len(ids) == 10 and len(set(ids)) == 10 for ids in answers)
    retired = {m.id_of(f"cc{j - 1}") for j in range(3, 40, 4)}
    assert m.retired == retired and not retired & set(top(m, "GNU C compiler gcc", 60))


@pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()), reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_backend_masks_retired_and_spare_rows():
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(48, 32, generator=g) * 2).to(FP8)
    scorer = Scorer(w, 37, "triton", spare=20, cuda_graphs=False)
    assert scorer.capacity == 64 and bool(scorer.dead[37:].all())
    scorer.write_rows([37, 38], (torch.randn(2, 32, generator=g) * 4).to(FP8))
    scorer.retire_rows([3, 38, 10])
    x = torch.randn(5, 32, generator=g)
    s, i = scorer.topk(x, 7, [[0], [], [5, 6], [], [1]])
    dead = [3, 10, 38]
    rs, ri = reference_topk(
        x,
        scorer.weights,
        7,
        39,
        [[0, *dead], dead, [5, 6, *dead], dead, [1, *dead]],
        fp8_dots=resolve_fp8_dots(scorer.weights, None),
    )
    assert torch.equal(i, ri), (i, ri)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-4)
