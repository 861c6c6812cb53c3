"""BGE-M3 unified fine-tuning: the heads, scores and loss against FlagEmbedding 1.4.2's M3 model (float64,
gradients included, in one process and across 2 real gloo processes), GradCache over M3's three outputs,
and an export that FlagEmbedding's BGEM3FlagModel loads with the same outputs."""

from __future__ import annotations

import math
import os
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bge_ray.model.grad_cache import micro_steps, train_micro_batch
from bge_ray.model.loss import m3_loss
from bge_ray.model.m3 import COLBERT_FILE, SPARSE_FILE, M3Embedder, colbert_size
from bge_ray.model.tokenizer import load_tokenizer
from bge_ray.train.export import export_model
from tests.flagembedding_compat import import_flag_model
from tests.helpers import build_tiny_bert
from tests.test_grad_cache import Plain, _batch, _close, _grads

T = 0.05
UNUSED = [0, 1, 2, 3]  # the stand-in tokenizer's pad, unk, cls and eos
FE_TOKENIZER = SimpleNamespace(pad_token_id=0, unk_token_id=1, cls_token_id=2, eos_token_id=3, padding_side="right")


def _parts(colbert_dim: int = 16, seed: int = 0):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=20, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return (BertModel(config).double(), nn.Linear(16, colbert_dim).double(), nn.Linear(16, 1).double())


def _inputs(b: int, g: int, seed: int = 3):
    """Queries and passages with padding and repeated tokens (ids from a 40-token vocabulary, unused ones too)."""
    gen = torch.Generator().manual_seed(seed)
    q_ids, p_ids = torch.randint(1, 40, (b, 6), generator=gen), torch.randint(1, 40, (b * g, 9), generator=gen)
    q_mask, p_mask = torch.ones_like(q_ids), torch.ones_like(p_ids)
    q_mask[0, 4:] = 0
    p_mask[1::2, 5:] = 0
    q_ids[q_mask == 0], p_ids[p_mask == 0] = 0, 0
    teacher = torch.randn(b, g, generator=gen, dtype=torch.float64)
    return q_ids, q_mask, p_ids, p_mask, teacher


def _flag_m3(parts, **settings):
    import_flag_model()
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import EncoderOnlyEmbedderM3Model

    model, colbert, sparse = parts
    fe = EncoderOnlyEmbedderM3Model({"model": model, "colbert_linear": colbert, "sparse_linear": sparse},
                                    tokenizer=FE_TOKENIZER, temperature=T, sentence_pooling_method="cls",
                                    normalize_embeddings=True, unified_finetuning=True, **settings)
    fe.train()
    return fe


def _grads_of(parts) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, module in zip(("model", "colbert_linear", "sparse_linear"), parts, strict=True):
        out.update({f"{prefix}.{n}": t.grad.clone() for n, t in module.named_parameters() if t.grad is not None})
        module.zero_grad(set_to_none=True)
    return out


CASES = {  # name: (kd_loss_type or None, self-distill, colbert_dim)
    "hard": (None, False, 16),
    "self_distill_kl_div": ("kl_div", True, 8),
    "m3_kd_loss": ("m3_kd_loss", True, 16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_m3_loss_and_gradients_match_flagembedding(case):
    kd, self_distill, colbert_dim = CASES[case]
    parts = _parts(colbert_dim)
    q_ids, q_mask, p_ids, p_mask, teacher = _inputs(b=3, g=4)
    fe = _flag_m3(parts, kd_loss_type=kd or "kl_div", use_self_distill=self_distill, self_distill_start_step=-1)
    want = fe(queries={"input_ids": q_ids, "attention_mask": q_mask},
              passages={"input_ids": p_ids, "attention_mask": p_mask},
              teacher_scores=teacher.flatten().tolist() if kd else None).loss
    want.backward()
    want_grads = _grads_of(parts)
    ours = M3Embedder(*parts, unused_tokens=UNUSED, pooling="cls", normalize=True).train()
    q, p = ours(q_ids, q_mask, p_ids, p_mask)
    got = m3_loss(q, p, q_mask, T, teacher_scores=teacher if kd else None, kd_loss_type=kd or "kl_div",
                  self_distill=self_distill)
    got.backward()
    got_grads = _grads_of(parts)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)  # FE's teacher targets are float32
    assert set(got_grads) == set(want_grads) and any(k.startswith("sparse_linear") for k in got_grads)
    for name, grad in want_grads.items():  # to float32's precision, relative to the tensor's own scale
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()) + 1e-15)


def test_each_score_matches_flagembedding():
    parts = _parts()
    q_ids, q_mask, p_ids, p_mask, _ = _inputs(b=2, g=3)
    fe = _flag_m3(parts)
    fe_q = fe.encode({"input_ids": q_ids, "attention_mask": q_mask})
    fe_p = fe.encode({"input_ids": p_ids, "attention_mask": p_mask})
    ours = M3Embedder(*parts, unused_tokens=UNUSED, pooling="cls", normalize=True).train()
    q, p = ours(q_ids, q_mask, p_ids, p_mask)
    for mine, theirs in zip(q + p, fe_q + fe_p, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    assert bool((q[1][:, UNUSED] == 0).all()) and int((q[1] > 0).sum()) > 4  # unused tokens weigh nothing
    from bge_ray.model.loss import colbert_scores

    torch.testing.assert_close(colbert_scores(q[2], p[2], q_mask) / T, fe.compute_colbert_score(q[2], p[2], q_mask))


def test_without_in_batch_negatives_each_query_is_its_own_batch():
    """Own-group scoring: the mean over queries of the loss of each query alone (where in-batch and own-group
    scores coincide, and FlagEmbedding's in-batch M3 loss is the reference above)."""
    parts = _parts()
    q_ids, q_mask, p_ids, p_mask, teacher = _inputs(b=3, g=4)
    ours = M3Embedder(*parts, unused_tokens=UNUSED, pooling="cls", normalize=True).train()
    q, p = ours(q_ids, q_mask, p_ids, p_mask)
    for kd in (None, "kl_div", "m3_kd_loss"):
        settings = {"teacher_scores": teacher if kd else None, "kd_loss_type": kd or "kl_div", "self_distill": True}
        own = m3_loss(q, p, q_mask, T, in_batch_negatives=False, **settings)
        alone = [m3_loss(tuple(t[i:i + 1] for t in q), tuple(t[i * 4:(i + 1) * 4] for t in p), q_mask[i:i + 1], T,
                         **{**settings, "teacher_scores": teacher[i:i + 1] if kd else None}) for i in range(3)]
        assert own.item() == pytest.approx(torch.stack(alone).mean().item(), rel=1e-12)


def test_loss_weights_default_to_flagembedding_and_change_the_loss():
    parts = _parts()
    q_ids, q_mask, p_ids, p_mask, _ = _inputs(b=2, g=3)
    q, p = M3Embedder(*parts, unused_tokens=UNUSED)(q_ids, q_mask, p_ids, p_mask)
    default = m3_loss(q, p, q_mask, T, self_distill=True)
    assert m3_loss(q, p, q_mask, T, self_distill=True, score_weights=(1.0, 0.3, 1.0),
                   loss_weights=(1.0, 0.1, 1.0)).item() == default.item()
    assert m3_loss(q, p, q_mask, T, self_distill=True, loss_weights=(1.0, 1.0, 1.0)).item() != default.item()
    assert m3_loss(q, p, q_mask, T, self_distill=True, score_weights=(1.0, 1.0, 0.0)).item() != default.item()


# ---- cross-device: 2 real gloo processes --------------------------------------------------------

def _cross_device_worker(rank, world, init_file, out_dir, kd):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    parts = _parts()
    q_ids, q_mask, p_ids, p_mask, teacher = _inputs(b=2 * world, g=3)
    sl_q, sl_p = slice(rank * 2, (rank + 1) * 2), slice(rank * 6, (rank + 1) * 6)
    settings = {"teacher_scores": teacher[sl_q] if kd else None, "kd_loss_type": kd or "kl_div", "self_distill": True}
    ours = M3Embedder(*parts, unused_tokens=UNUSED, pooling="cls", normalize=True).train()
    q, p = ours(q_ids[sl_q], q_mask[sl_q], p_ids[sl_p], p_mask[sl_p])
    loss = m3_loss(q, p, q_mask[sl_q], T, cross_device=True, **settings)
    loss.backward()
    grads = _grads_of(parts)
    for g in grads.values():  # what data-parallel training does: average the workers' gradients
        dist.all_reduce(g)
        g /= world
    fe = _flag_m3(_parts(), negatives_cross_device=True, kd_loss_type=kd or "kl_div", use_self_distill=True)
    fe_loss = fe(queries={"input_ids": q_ids[sl_q], "attention_mask": q_mask[sl_q]},
                 passages={"input_ids": p_ids[sl_p], "attention_mask": p_mask[sl_p]},
                 teacher_scores=teacher[sl_q].flatten().tolist() if kd else None).loss
    torch.save({"loss": loss.item(), "fe_loss": fe_loss.item(), "grads": grads}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def _flag_dense(parts, q, p, teacher, kd):
    """FlagEmbedding's base (dense-only) in-batch loss of one batch."""
    from FlagEmbedding.finetune.embedder.encoder_only.base.modeling import BiEncoderOnlyEmbedderModel

    fe = BiEncoderOnlyEmbedderModel(parts[0], temperature=T, sentence_pooling_method="cls", normalize_embeddings=True,
                                    kd_loss_type=kd or "kl_div")
    fe.train()
    return fe(queries=q, passages=p, teacher_scores=teacher.flatten().tolist() if kd else None).loss


@pytest.mark.slow  # two processes in a gloo group
@pytest.mark.parametrize("kd", [None, "kl_div"])
def test_cross_device_dense_negatives_with_local_sparse_and_colbert(kd):
    """Per worker the loss is FlagEmbedding's M3 cross-device loss; the workers' averaged gradient is that of
    FlagEmbedding's M3 loss on each worker's batch alone with its dense term replaced by the dense loss of the
    global batch (sparse, ColBERT and the ensemble stay on each worker's batch, as in FlagEmbedding)."""
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_cross_device_worker, args=(world, os.path.join(tmp, "init"), tmp, kd), nprocs=world, join=True)
        outs = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(world)]
    for out in outs:
        assert out["loss"] == pytest.approx(out["fe_loss"], rel=1e-6)
    parts = _parts()
    q_ids, q_mask, p_ids, p_mask, teacher = _inputs(b=2 * world, g=3)
    fe = _flag_m3(parts, kd_loss_type=kd or "kl_div", use_self_distill=True)
    share = 8  # the dense loss's share of the M3 loss: 1/4, halved again with self-distillation
    reference = _flag_dense(parts, {"input_ids": q_ids, "attention_mask": q_mask},
                            {"input_ids": p_ids, "attention_mask": p_mask}, teacher, kd) / share
    for r in range(world):
        sl_q, sl_p = slice(r * 2, (r + 1) * 2), slice(r * 6, (r + 1) * 6)
        q, p = {"input_ids": q_ids[sl_q], "attention_mask": q_mask[sl_q]}, {"input_ids": p_ids[sl_p],
                                                                            "attention_mask": p_mask[sl_p]}
        local = fe(queries=q, passages=p, teacher_scores=teacher[sl_q].flatten().tolist() if kd else None).loss
        reference = reference + (local - _flag_dense(parts, q, p, teacher[sl_q], kd) / share) / world
    reference.backward()
    want = _grads_of(parts)
    assert set(want) == set(outs[0]["grads"])
    for name, grad in want.items():
        torch.testing.assert_close(outs[0]["grads"][name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()) + 1e-15)


# ---- GradCache over M3's outputs ----------------------------------------------------------------

def test_grad_cache_gives_the_whole_batch_gradient_for_m3(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    model = M3Embedder.from_pretrained(tiny_model, tokenizer=tokenizer, colbert_dim=8).double().train()
    for module in model.modules():  # dropout off: the calls below must see the same function
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    batch = _batch(tokenizer, n_queries=4, group=3)
    teacher = torch.randn(4, 3, dtype=torch.float64)

    def loss_fn(q, p):
        return m3_loss(q, p, batch["q_attention_mask"], T, teacher_scores=teacher, self_distill=True)

    whole = train_micro_batch(Plain(model), batch, loss_fn)
    full = _grads(model)
    assert any(k.startswith("colbert_linear") for k in full) and any(k.startswith("sparse_linear") for k in full)
    for sub in (1, 5):
        loss = train_micro_batch(Plain(model, micro_steps(4, 3, sub)), batch, loss_fn, sub_batch_size=sub)
        cached = _grads(model)
        assert loss.item() == pytest.approx(whole.item(), rel=1e-9)
        for name, g in full.items():
            assert _close(cached[name], g), (sub, name)


# ---- heads on disk, export ----------------------------------------------------------------------

def test_export_loads_in_bgem3flagmodel_with_the_same_outputs(tiny_model, tmp_path):
    tokenizer = load_tokenizer(tiny_model)
    model = M3Embedder.from_pretrained(tiny_model, tokenizer=tokenizer, colbert_dim=12, seed=5).eval()
    with torch.no_grad():  # a trained-looking sparse head: positive weights for most tokens
        model.sparse_linear.bias.fill_(0.5)
    cfg = {"sentence_pooling_method": "cls", "normalize_embeddings": True, "query_instruction_format": "{}{}",
           "query_instruction_for_retrieval": None, "passage_instruction_format": "{}{}",
           "passage_instruction_for_retrieval": None, "query_max_len": 32, "passage_max_len": 64,
           "unified_finetuning": True}
    out = str(tmp_path / "m3")
    export_model(model.model, tokenizer, {k[len("model."):]: v for k, v in model.state_dict().items()
                                          if k.startswith("model.")}, out, cfg, heads=model.state_dict())
    assert os.path.isfile(os.path.join(out, COLBERT_FILE)) and os.path.isfile(os.path.join(out, SPARSE_FILE))
    # loading the export keeps its heads (FlagEmbedding's rule), whatever the seed
    again = M3Embedder.from_pretrained(out, tokenizer=tokenizer, seed=99)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], t)
    assert colbert_size(out) == 12
    with pytest.raises(ValueError, match="colbert_dim 8: .* has a ColBERT head of size 12"):
        colbert_size(out, 8)
    import_flag_model()
    from FlagEmbedding import BGEM3FlagModel

    texts = ["what causes rain and rain and rain", "a short one", "the sky is blue because of scattering"]
    fe = BGEM3FlagModel(out, use_fp16=False, devices="cpu", pooling_method="cls", normalize_embeddings=True,
                        colbert_dim=12)  # FlagEmbedding needs a ColBERT size other than the hidden size named
    got = fe.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True, max_length=64)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        dense, sparse, colbert = model.encode_all(enc["input_ids"], enc["attention_mask"])
    np.testing.assert_allclose(got["dense_vecs"], dense.numpy(), rtol=1e-5, atol=1e-6)
    for i in range(len(texts)):
        n = int(enc["attention_mask"][i].sum())
        np.testing.assert_allclose(got["colbert_vecs"][i], colbert[i, :n - 1].numpy(), rtol=1e-5, atol=1e-6)
        theirs = {int(k): float(v) for k, v in got["lexical_weights"][i].items()}
        mine = {int(j): float(sparse[i, j]) for j in torch.nonzero(sparse[i]).flatten()}
        assert theirs.keys() == mine.keys() and len(mine) > 3
        assert all(abs(theirs[k] - mine[k]) < 1e-5 for k in mine)


# ---- retrieval in every mode --------------------------------------------------------------------

M3_CFG = {"sentence_pooling_method": "cls", "normalize_embeddings": True, "query_instruction_format": "{}{}",
          "query_instruction_for_retrieval": None, "passage_instruction_format": "{}{}",
          "passage_instruction_for_retrieval": None, "query_max_len": 32, "passage_max_len": 64}


@pytest.fixture(scope="module")
def m3_model(tiny_model, tmp_path_factory) -> str:
    """An exported BGE-M3-shaped model whose sparse head gives most tokens a weight."""
    return _export_m3(tiny_model, str(tmp_path_factory.mktemp("m3") / "model"))


@pytest.fixture(scope="module")
def m3_spread(tmp_path_factory) -> str:
    """:func:`m3_model` on a BERT drawn wider, so its rankings are not float-noise ties: at BERT's init the
    [CLS] embeddings of a tiny random model differ by ~1e-7 between texts, and how a batch is padded decides
    the order."""
    base = build_tiny_bert(str(tmp_path_factory.mktemp("m3_spread_base")), init_range=0.2)
    return _export_m3(base, str(tmp_path_factory.mktemp("m3_spread") / "model"))


def _export_m3(base: str, out: str) -> str:
    tokenizer = load_tokenizer(base)
    model = M3Embedder.from_pretrained(base, tokenizer=tokenizer, seed=2)
    with torch.no_grad():
        model.sparse_linear.bias.fill_(0.3)
    export_model(model.model, tokenizer, model.model.state_dict(), out, {**M3_CFG, "unified_finetuning": True,
                                                                         "m3_score_weights": [1.0, 0.3, 1.0]},
                 heads=model.state_dict())
    return out


def _flag_m3_model(path):
    import_flag_model()
    from FlagEmbedding import BGEM3FlagModel

    return BGEM3FlagModel(path, use_fp16=False, devices="cpu", pooling_method="cls", normalize_embeddings=True)


def test_texts_embed_and_score_as_bgem3flagmodel_does(m3_model):
    from bge_ray.retrieval.m3 import colbert_scores, encode_m3_texts, lexical_scores

    tokenizer = load_tokenizer(m3_model)
    model = M3Embedder.from_pretrained(m3_model, tokenizer=tokenizer).eval()
    queries = ["what causes rain", "why is the sky blue blue"]
    docs = ["rain comes from clouds", "the sky is blue because of scattering of light", "a", "clouds clouds rain"]
    ours_q = encode_m3_texts(model, tokenizer, queries, 32, 3, torch.device("cpu"))
    ours_d = encode_m3_texts(model, tokenizer, docs, 64, 3, torch.device("cpu"))
    fe = _flag_m3_model(m3_model)
    fe_q, fe_d = (fe.encode(t, return_dense=True, return_sparse=True, return_colbert_vecs=True, max_length=n)
                  for t, n in ((queries, 32), (docs, 64)))
    np.testing.assert_allclose(ours_d["dense"], fe_d["dense_vecs"], rtol=1e-5, atol=1e-6)
    for i in range(len(docs)):
        np.testing.assert_allclose(ours_d["colbert"][i], fe_d["colbert_vecs"][i], rtol=1e-5, atol=1e-6)
        assert dict(zip(ours_d["sparse_ids"][i].tolist(), ours_d["sparse_weights"][i].tolist(), strict=True)) == \
            pytest.approx({int(k): float(v) for k, v in fe_d["lexical_weights"][i].items()}, rel=1e-5)
    sparse = lexical_scores(ours_q["sparse_ids"], ours_q["sparse_weights"], ours_d["sparse_ids"], ours_d["sparse_weights"])
    colbert = colbert_scores(ours_q["colbert"], ours_d["colbert"])
    for i in range(len(queries)):
        for j in range(len(docs)):
            want = fe.compute_lexical_matching_score(fe_q["lexical_weights"][i], fe_d["lexical_weights"][j])
            assert float(sparse[i, j]) == pytest.approx(float(want), rel=1e-5, abs=1e-7)
            want = fe.colbert_score(fe_q["colbert_vecs"][i], fe_d["colbert_vecs"][j])
            assert float(colbert[i, j]) == pytest.approx(float(want), rel=1e-5)
    assert float(sparse.max()) > 0


def test_search_in_chunks_equals_scoring_every_pair(m3_model):
    from bge_ray.retrieval.m3 import COLBERT_BUDGET, M3Search, colbert_scores, encode_m3_texts, lexical_scores

    tokenizer = load_tokenizer(m3_model)
    model = M3Embedder.from_pretrained(m3_model, tokenizer=tokenizer).eval()
    texts = [f"passage {i} about {'rain ' * (i % 4)}clouds and {'light ' * (i % 3)}" for i in range(23)]
    q = encode_m3_texts(model, tokenizer, ["rain clouds", "light"], 32, 8, torch.device("cpu"))
    d = encode_m3_texts(model, tokenizer, texts, 64, 8, torch.device("cpu"))
    ids = [f"d{i}" for i in range(len(texts))]
    search = M3Search(q, ("dense", "sparse", "colbert", "hybrid"), (1.0, 0.3, 1.0), k=5)
    for start in range(0, len(texts), 6):
        search.add({key: d[key][start:start + 6] for key in d}, ids[start:start + 6])
    runs = search.runs(["q0", "q1"])
    dense = torch.as_tensor(q["dense"]) @ torch.as_tensor(d["dense"]).T
    sparse = lexical_scores(q["sparse_ids"], q["sparse_weights"], d["sparse_ids"], d["sparse_weights"])
    colbert = colbert_scores(q["colbert"], d["colbert"])
    hybrid = (dense + 0.3 * sparse + colbert) / 2.3
    for mode, scores in (("dense", dense), ("sparse", sparse), ("colbert", colbert), ("hybrid", hybrid)):
        top = torch.topk(scores, 5, dim=1)
        for row, qid in enumerate(["q0", "q1"]):
            want = {ids[j]: float(v) for j, v in zip(top.indices[row].tolist(), top.values[row].tolist(), strict=True)}
            assert runs[mode][qid] == pytest.approx(want, rel=1e-5), mode
    assert COLBERT_BUDGET > 0 and runs["sparse"] != runs["dense"]


def test_eval_scores_every_mode_of_an_m3_model(ray_cluster, m3_spread, tmp_path):
    """bge-ray eval on Ray Data: one row per mode, each equal to scoring every pair in process."""
    from bge_ray.retrieval.datasets import load_dataset
    from bge_ray.retrieval.evaluate import evaluate, format_table
    from bge_ray.retrieval.m3 import colbert_scores, encode_m3_texts, lexical_scores
    from bge_ray.retrieval.metrics import evaluate_run
    from tests.helpers import make_beir_subset

    beir = make_beir_subset(str(tmp_path / "beir"), n_queries=8, n_extra_docs=20)
    rows = evaluate([m3_spread], beir, ks=(1, 10), concurrency=1, output_dir=str(tmp_path / "out"))
    assert [r["mode"] for r in rows] == ["dense", "sparse", "colbert", "hybrid"]
    assert "| model | mode | queries |" in format_table(rows, (1, 10), markdown=True)
    ds = load_dataset(beir)
    with open(os.path.join(beir, "corpus.jsonl")) as f:
        corpus = [__import__("json").loads(line) for line in f]
    doc_ids = [str(c["_id"]) for c in corpus]
    texts = [(c.get("title", "") + " " + c["text"]).strip() for c in corpus]
    qids = list(ds.eval_queries)
    tokenizer = load_tokenizer(m3_spread)
    model = M3Embedder.from_pretrained(m3_spread, tokenizer=tokenizer).eval()
    q = encode_m3_texts(model, tokenizer, [ds.eval_queries[i] for i in qids], 64, 16, torch.device("cpu"))
    d = encode_m3_texts(model, tokenizer, texts, 256, 16, torch.device("cpu"))
    dense = torch.as_tensor(q["dense"]) @ torch.as_tensor(d["dense"]).T
    sparse = lexical_scores(q["sparse_ids"], q["sparse_weights"], d["sparse_ids"], d["sparse_weights"])
    colbert = colbert_scores(q["colbert"], d["colbert"])
    for row, scores in zip(rows, (dense, sparse, colbert, (dense + 0.3 * sparse + colbert) / 2.3), strict=True):
        run = {qid: {doc_ids[j]: float(scores[i, j]) for j in range(len(doc_ids))} for i, qid in enumerate(qids)}
        want = evaluate_run(ds.qrels, run, (1, 10))
        assert row["ndcg@10"] == pytest.approx(want["ndcg@10"], abs=1e-6), row["mode"]
    assert len({round(r["ndcg@10"], 6) for r in rows}) > 1


def test_modes_a_model_cannot_score_are_refused_before_ray(tiny_model):
    from bge_ray.errors import ConfigError
    from bge_ray.retrieval.evaluate import check_modes

    with pytest.raises(ConfigError, match="has no BGE-M3 heads"):
        check_modes(tiny_model, ("sparse",))
    with pytest.raises(ConfigError, match="unknown"):
        check_modes(tiny_model, ("lexical",))
    with pytest.raises(ConfigError, match="three numbers|dense, sparse and ColBERT weights"):
        check_modes(tiny_model, None, weights=(1.0, 0.3))
    assert check_modes(tiny_model, None) == ("dense",)
    with pytest.raises(ConfigError, match="weighs the hybrid mode, which .* is not scored in"):
        check_modes(tiny_model, None, weights=(1.0, 0.3, 1.0))  # accepted and ignored would be silent


# ---- a unified fine-tune through Ray Train + DeepSpeed ------------------------------------------

def test_unified_finetune_under_zero3_exports_a_model_bgem3flagmodel_loads(ray_cluster, tiny_model, tmp_path):
    """Two workers, ZeRO-3, cross-device negatives, GradCache, gradient checkpointing and self-distillation
    from the second micro-batch: the heads train with the encoder and come out where BGEM3FlagModel reads them;
    validation scores every mode and the best checkpoint is picked by the hybrid's."""
    import bge_ray
    from tests.helpers import FE_EXAMPLES, make_beir_subset

    result = bge_ray.finetune({
        "model_name_or_path": tiny_model, "train_data": [FE_EXAMPLES], "output_dir": str(tmp_path / "model"),
        "storage_path": str(tmp_path / "storage"), "num_workers": 2, "deepspeed": "zero3",
        "per_device_train_batch_size": 4, "train_group_size": 3, "query_max_len": 16, "passage_max_len": 32,
        "negatives_cross_device": True, "gradient_checkpointing": True, "sub_batch_size": 5,
        "unified_finetuning": True, "use_self_distill": True, "self_distill_start_step": 0, "colbert_dim": 8,
        "learning_rate": 1e-3, "max_steps": 3, "logging_steps": 1, "save_steps": 100, "seed": 4,
        "eval_data": make_beir_subset(str(tmp_path / "eval"), n_queries=6, n_extra_docs=10), "eval_steps": 2,
        "metric_for_best_model": "ndcg@10_hybrid",
    })
    assert result.metrics["step"] == 3
    for e in result.evals:
        assert {"eval_ndcg@10", "eval_ndcg@10_sparse", "eval_ndcg@10_colbert", "eval_ndcg@10_hybrid"} <= set(e), e
    best = max((e for e in result.evals if e["step"] > 0), key=lambda e: e["eval_ndcg@10_hybrid"])
    assert result.metrics["best_eval_ndcg@10_hybrid"] == best["eval_ndcg@10_hybrid"]
    assert all(math.isfinite(r["loss"]) for r in result.history if r.get("kind") == "train")
    tokenizer = load_tokenizer(tiny_model)
    start = M3Embedder.from_pretrained(tiny_model, tokenizer=tokenizer, colbert_dim=8, seed=4)
    trained = M3Embedder.from_pretrained(result.model_dir, tokenizer=tokenizer).eval()
    for name in ("colbert_linear.weight", "sparse_linear.weight", "model.encoder.layer.0.output.dense.weight"):
        assert trained.state_dict()[name].shape == start.state_dict()[name].shape
        assert not torch.equal(trained.state_dict()[name], start.state_dict()[name]), name  # trained, all of it
    import_flag_model()
    from FlagEmbedding import BGEM3FlagModel

    texts = ["what causes rain", "the sky is blue because of scattering"]
    fe = BGEM3FlagModel(result.model_dir, use_fp16=False, devices="cpu", colbert_dim=8)
    got = fe.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        dense, sparse, colbert = trained.encode_all(enc["input_ids"], enc["attention_mask"])
    np.testing.assert_allclose(got["dense_vecs"], dense.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["colbert_vecs"][1], colbert[1, :int(enc["attention_mask"][1].sum()) - 1].numpy(),
                               rtol=1e-5, atol=1e-6)
    assert {int(k) for k in got["lexical_weights"][0]} == {int(j) for j in torch.nonzero(sparse[0]).flatten()}
    with open(os.path.join(result.model_dir, "README.md")) as f:
        assert "BGEM3FlagModel(path, pooling_method=\"cls\", colbert_dim=8)" in f.read()


def test_a_colbert_dim_the_model_cannot_have_fails_before_ray_starts(tiny_model, tmp_path):
    import ray

    import bge_ray
    from bge_ray.errors import ConfigError
    from tests.helpers import FE_EXAMPLES

    tokenizer = load_tokenizer(tiny_model)
    model = M3Embedder.from_pretrained(tiny_model, tokenizer=tokenizer, colbert_dim=12)
    m3 = str(tmp_path / "m3")
    export_model(model.model, tokenizer, model.model.state_dict(), m3,
                 {"sentence_pooling_method": "cls", "normalize_embeddings": True, "query_instruction_format": "{}{}",
                  "query_instruction_for_retrieval": None, "passage_instruction_format": "{}{}",
                  "passage_instruction_for_retrieval": None, "query_max_len": 32, "passage_max_len": 64},
                 heads=model.state_dict())
    was_up = ray.is_initialized()
    with pytest.raises(ConfigError, match="colbert_dim 16: .* has a ColBERT head of size 12"):
        bge_ray.finetune({"model_name_or_path": m3, "train_data": [FE_EXAMPLES], "output_dir": str(tmp_path / "out"),
                          "storage_path": str(tmp_path / "runs"), "unified_finetuning": True, "colbert_dim": 16})
    assert ray.is_initialized() == was_up  # refused before connecting to (or starting) Ray


def test_fix_encoder_leaves_only_the_heads_trainable(tiny_model):
    model = M3Embedder.from_pretrained(tiny_model, tokenizer=load_tokenizer(tiny_model))
    model.freeze_encoder()
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"colbert_linear",
                                                                                           "sparse_linear"}
