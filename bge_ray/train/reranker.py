"""A worker's fine-tune of a reranker (``task: reranker``): the embedder's recipe (data, resume,
DeepSpeed engine, logging, checkpoints) with a cross-encoder for the model, FlagEmbedding's reranker
loss for the step, validation by reranking a retriever's top k, and a sequence-classifier export."""

from __future__ import annotations

from typing import Any

import torch

from bge_ray.data.collate import PairCollator
from bge_ray.data.text import TextSpec
from bge_ray.model.lora import add_lora, lora_config_of
from bge_ray.model.reranker import LLMReranker, Reranker, rerank_loss, yes_token
from bge_ray.retrieval.evaluate import validate_reranker
from bge_ray.train.export import export_lora, export_reranker, transformer_state
from bge_ray.train.recipe import EmbedderRecipe


class RerankerRecipe(EmbedderRecipe):
    """One worker's fine-tune of a reranker."""

    def make_collators(self) -> list[Any]:
        cfg = self.cfg
        return [PairCollator(group_size=ds.group_size, pad_token_id=self.tokenizer.pad_token_id,
                             padding_side=self.tokenizer.padding_side, pad_to_multiple_of=cfg.pad_to_multiple_of,
                             knowledge_distillation=cfg.knowledge_distillation and ds.has_scores)
                for ds in self.datasets]

    def build_model(self) -> torch.nn.Module:
        """A cross-encoder (a new classification head drawn from ``seed``), or an LLM reranker with LoRA
        adapters drawn from ``seed`` (``use_lora``): alike on every worker."""
        cfg = self.cfg
        loading = {"cache_dir": cfg.cache_dir, "trust_remote_code": cfg.trust_remote_code,
                   "attention_dropout": cfg.attention_dropout}
        if cfg.model_type != "decoder":
            return Reranker.from_pretrained(cfg.model_name_or_path, seed=cfg.seed, **loading)
        model = LLMReranker.from_pretrained(cfg.model_name_or_path, yes_token(self.tokenizer), **loading)
        if cfg.use_lora:
            model.model = add_lora(model.model, lora_config_of(cfg, causal_lm=True), cfg.seed)
        return model

    def train_step(self, item: tuple[int, dict[str, Any]], waited: float, forward: int = 0) -> None:  # noqa: ARG002
        """One micro-batch: every (query, passage) pair scored, cross-entropy over each query's group
        (+ the teacher's soft targets), backward, DeepSpeed step."""
        d, inputs, tokens = self.take_batch(item)
        logits = self.engine(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"))
        loss = rerank_loss(logits.float(), self.datasets[d].group_size, inputs.get("teacher_scores"))
        self.engine.backward(loss)
        self.engine.step()
        groups = inputs["input_ids"].shape[0] // self.datasets[d].group_size
        self.count(loss.detach(), groups, tokens, waited)

    def measure(self) -> dict[str, float]:
        """The metrics of reranking each validation query's candidates (the retriever's top k)."""
        return validate_reranker(self.engine.module, self.tokenizer, self.vset, TextSpec.from_config(self.cfg),
                                 self.cfg.eval_batch_size, self.device)

    def export_weights(self, state_dict: dict[str, torch.Tensor], out_dir: str) -> None:
        if self.cfg.use_lora:
            export_lora(self.engine.module.model, self.tokenizer, transformer_state(state_dict), out_dir,
                        self.cfg.to_dict())
            return
        export_reranker(self.engine.module.model, self.tokenizer, transformer_state(state_dict), out_dir,
                        self.cfg.to_dict())
