"""Pairwise preference model (`trainer: preference_model`): "is A better than B?" with calibrated
uncertainty, the scorer of routed RL and of `align serve-rm`'s /v1/compare.

    align train configs/pm_hhh.yaml pm.uncertainty=sngp

One sequence holds the prompt and both responses (rewards/preference_model.py); the logit g is
trained with a registered pairwise loss (`bt`, or `r3m` for noisy labels) on the margin
g(x, chosen, rejected). With `pm.both_orders` (default) every pair is also shown swapped, with
margin -g(x, rejected, chosen): the model learns the antisymmetry that the router relies on, and
position bias is trained away. After training, SNGP's precision matrix is accumulated in one pass
over the training pairs (both orders) with the final model, summed over ranks, and saved with the
head in `final/` (`preference_head.safetensors`, `preference_model.json`, beside the backbone), with
`calibration.json`: held-out accuracy per uncertainty decile and the thresholds that route 10 / 20 /
40 % of pairs.

SNGP can only flag an input whose features differ from the training data's. Measured on the word
task of tests/test_routing.py: a tiny Llama fine-tuned end to end from scratch put pairs of unseen
words as close to the training pairs (mean nearest-neighbour distance of pooled states 0.65) as
held-out in-distribution pairs (0.77), and no head could tell them apart (AUROC 0.57-0.66); with the
backbone frozen they were separated (AUROC 0.995) but in-distribution accuracy fell to 0.67; training
only the top layer (`pm.trainable_layers: 1`) gave both (0.88 accuracy, AUROC 0.87-0.95). A large
pretrained backbone keeps unseen inputs apart by itself; the option is there for small ones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from alignment.config import BaseConfig, ConfigError, bounded
from alignment.data import in_both_orders
from alignment.adapters import apply_peft
from alignment.models import resolve_path
from alignment.offline import PairwiseTrainer
from rewards.preference_model import HEAD_FILE, HeadOptions, PreferenceModel, encode_comparison

log = logging.getLogger("alignment")


@dataclass
class PMOptions(HeadOptions):
    loss: Literal["bt", "r3m"] = "bt"  # bt: Bradley-Terry; r3m: R^3M (sparse outliers, l1-penalised MLE)
    lam: float = 0.75  # R^3M lambda in (0, 1)
    both_orders: bool = True  # every pair also shown with A and B swapped
    # transformer layers of the backbone that are trained, counted from the top; the embeddings and the
    # layers below stay as loaded. -1: all (full fine-tuning); 0: the head only. A feature map that is
    # not fine-tuned cannot collapse inputs it has not seen onto the training data, which SNGP needs.
    trainable_layers: int = bounded(-1, ge=-1)
    # precision weights: identity (the reference code) or p(1 - p) (the Laplace approximation)
    laplace_weights: bool = False


@dataclass
class PreferenceModelConfig(BaseConfig):
    trainer: str = "preference_model"
    pm: PMOptions = field(default_factory=PMOptions)


def freeze_below_top(backbone: torch.nn.Module, trainable: int) -> None:
    """Train only the top `trainable` transformer layers (and the final norm when any are trained)."""
    layers = next((m for name, m in backbone.named_modules() if isinstance(m, torch.nn.ModuleList)
                   and name.split(".")[-1] in ("layers", "layer", "h")), None)
    if layers is None:
        raise ConfigError(f"pm.trainable_layers: cannot find the transformer layers of {type(backbone).__name__}")
    backbone.requires_grad_(False)
    if trainable:
        for layer in layers[len(layers) - trainable:]:
            layer.requires_grad_(True)
        norm = getattr(backbone, "norm", None)
        if norm is not None:
            norm.requires_grad_(True)


class PreferenceModelTrainer(PairwiseTrainer):
    config_class = PreferenceModelConfig
    section = "pm"

    def check_config(self) -> None:
        super().check_config()
        pm = self.cfg.pm
        spread = {"ensemble": ("ensemble_size", pm.ensemble_size), "mc_dropout": ("mc_samples", pm.mc_samples)}
        if pm.uncertainty in spread and spread[pm.uncertainty][1] < 2:
            raise ConfigError(f"pm.{spread[pm.uncertainty][0]}: at least 2 with pm.uncertainty={pm.uncertainty}, "
                              "to have a spread")

    def build_model(self):
        from transformers import AutoModel

        cfg = self.cfg
        backbone = AutoModel.from_pretrained(resolve_path(cfg.model.path), dtype=torch.float32,
                                             trust_remote_code=cfg.model.trust_remote_code,
                                             attn_implementation=cfg.model.attn_implementation)
        hidden = backbone.config.hidden_size
        if cfg.pm.trainable_layers >= 0:
            if cfg.peft.type != "none":
                raise ConfigError("pm.trainable_layers freezes part of the backbone; it cannot be combined with peft "
                                  "(set pm.trainable_layers=-1, or peft.type=none)")
            freeze_below_top(backbone, cfg.pm.trainable_layers)
        backbone = apply_peft(backbone, cfg.peft, self.total_updates)
        head_fields = {f.name for f in dataclasses.fields(HeadOptions)}
        options = HeadOptions(**{k: v for k, v in dataclasses.asdict(cfg.pm).items() if k in head_fields})
        if options.pooling == "auto":
            options.pooling = "last" if self.tokenizer.chat_template else "first"
        self.module = PreferenceModel(backbone, hidden, options, cfg.train.bf16)
        return backbone

    def encode(self, pairs, both_orders: bool = True) -> dict[str, torch.Tensor]:
        """(prompt, chosen, rejected) rows, then (prompt, rejected, chosen) rows when `both_orders`."""
        prompts = [p.prompt for p in pairs]
        chosen, rejected = [p.chosen for p in pairs], [p.rejected for p in pairs]
        if both_orders:
            prompts, chosen, rejected = in_both_orders(prompts, chosen, rejected)
        encoded = encode_comparison(self.tokenizer, prompts, chosen, rejected, self.cfg.pm.max_length)
        return {k: v.to(self.backend.device) for k, v in encoded.items()}

    def margins(self, pairs):
        encoded = self.encode(pairs, self.cfg.pm.both_orders)
        logits = self.backend(**encoded)
        if self.cfg.pm.both_orders:
            logits = torch.cat([logits[: len(pairs)], -logits[len(pairs):]])
        return logits, int(encoded["attention_mask"].sum())

    # ---- the head is not part of the transformers backbone: checkpoint it beside --------------
    def save_extra(self, folder: Path) -> None:
        with self.backend.gathered():
            if self.backend.is_main:
                self.module.save_head(folder)

    def load_extra(self, folder: Path) -> None:
        from safetensors.torch import load_file

        self.module.load_head_state(load_file(str(folder / HEAD_FILE)))

    @torch.no_grad()
    def finish(self, out: Path) -> None:
        super().finish(out)
        self.module.eval()
        if self.cfg.pm.uncertainty == "sngp":
            self.fit_precision()
        with self.backend.gathered():
            if self.backend.is_main:
                self.module.save_head(out / "final")
        self.write_calibration(out / "final")

    def write_calibration(self, folder: Path) -> None:
        """Held-out accuracy per uncertainty decile, and the thresholds that would route 10 / 20 / 40 %
        of the pairs (`calibration.json`): what router.threshold should be chosen from."""
        pairs = self.eval_set or self.train_set
        mine = pairs[self.rank::self.world]
        rows = []
        with self.backend.gathered():
            for start in range(0, len(mine), self.eval_batch_size):
                batch = mine[start:start + self.eval_batch_size]
                g, u = self.module.predict(**self.encode(batch))
                n = len(batch)
                rows += list(zip(((g[:n] - g[n:]) / 2 > 0).tolist(), ((u[:n] + u[n:]) / 2).tolist()))
        everyone = self.backend.gather(rows)
        if not self.backend.is_main:
            return
        rows = sorted((r for part in everyone for r in part), key=lambda r: r[1])
        deciles = []
        for d in range(10):
            part = rows[d * len(rows) // 10:(d + 1) * len(rows) // 10]
            if part:
                deciles.append({"uncertainty_max": part[-1][1], "accuracy": sum(c for c, _ in part) / len(part),
                                "pairs": len(part)})
        thresholds = {f"{frac:g}": rows[min(len(rows) - 1, int((1 - frac) * len(rows)))][1] for frac in (0.1, 0.2, 0.4)}
        report = {"split": "held-out" if self.eval_set else "train", "deciles": deciles,
                  "threshold_for_judge_frac": thresholds}
        (folder / "calibration.json").write_text(json.dumps(report, indent=2))
        log.info("accuracy by uncertainty decile (%s): %s; thresholds routing 10/20/40%%: %s", report["split"],
                 " ".join(f"{d['accuracy']:.2f}" for d in deciles),
                 " ".join(f"{t:.4f}" for t in thresholds.values()))

    def fit_precision(self) -> None:
        """P = sum over this rank's training pairs, both orders, of w phi phi^T; summed over ranks."""
        model: PreferenceModel = self.module
        d = model.options.random_features
        precision = torch.zeros(d, d, dtype=torch.float64, device=self.backend.device)
        mine = self.train_set[self.rank::self.world]
        with self.backend.gathered():
            for start in range(0, len(mine), self.eval_batch_size):
                phi = model.features(model.pooled(**self.encode(mine[start:start + self.eval_batch_size])))[:, 0]
                phi = phi.double()
                if self.cfg.pm.laplace_weights:
                    p = torch.sigmoid(phi @ model.beta[0].double())
                    phi = phi * (p * (1 - p)).sqrt()[:, None]
                precision += phi.T @ phi
        if self.world > 1:
            dist.all_reduce(precision)
        model.set_precision(precision.float())
        log.info("SNGP precision fitted on %d training pairs (both orders)", len(self.train_set))
