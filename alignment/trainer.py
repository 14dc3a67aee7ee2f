"""What every trainer shares: the run loop, metrics, atomic checkpoints, resume and the final model.

A trainer's `__init__` calls `Trainer.__init__(cfg)` first (it checks the output folder and the
resume before anything is loaded), then builds `self.tokenizer`, `self.model` (the transformers or
PEFT model that is saved) and `self.backend` in its own visible order, and defines
`step(step) -> metrics` and `evaluate() -> metrics`. The run calls, besides: `start()` after a resume
and before the first step (the online trainers push weights to their engine there), `finish(out)`
at the end for method-specific outputs (R^3M's outliers.jsonl), and `save_extra` / `load_extra`
with each checkpoint for what the model and backend do not hold (PPO's critic).

Resume (`resume=true`: the newest checkpoint of output_dir; `resume=PATH`: that `step-N` folder,
absolute or relative to the working directory) compares the new config with the checkpoint's (its
`config.yaml`, or `<output_dir>/config.yaml` for checkpoints written before step-N folders held one,
and its `trainer_state.json`): a changed key of `resume_fixed_keys` refuses, any other change is
logged and the new value is used (the optimizer's restored lr and weight decay included).

resume=PATH rewinds: checkpoints of output_dir past PATH's step belong to the continuation being
replaced, so they are moved aside to `checkpoints/step-M.superseded` (kept, with a warning; never picked
by resume=true nor counted by `train.save_total_limit`), as metrics.jsonl drops its rows past the step.

`checkpoints/step-N` holds the training state in fp32 (weights, optimizer, scheduler: resume is
exact), the tokenizer and the config; `train.save_total_limit` keeps the newest N of them. `final/`
holds the model in its source dtype (the `dtype` of the loaded model's config.json, as TRL saves it:
bf16 for a bf16 hub model; fp32 for fp32 ones) with the tokenizer; PEFT runs add their adapters (fp32,
PEFT's own convention) under `final/adapter`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from alignment.backend import Backend
from alignment.config import BaseConfig, ConfigError, read_yaml, save_config, to_dict
from alignment.logging import RunLogger, check_trackers, flatten, plot_report
from alignment.precision import resolve_bf16
from alignment.adapters import hf_model, merged_state_dict

log = logging.getLogger("alignment")


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first; `.tmp` (incomplete) and `.superseded` folders are not."""
    done = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def latest_checkpoint(root: Path) -> Path | None:
    """Newest complete checkpoint."""
    done = checkpoints(root)
    return done[-1] if done else None


def checkpoint_folder(path: str) -> Path:
    """`resume=PATH`: a complete `step-N` checkpoint folder, or a ConfigError that says what PATH is."""
    folder = Path(path).expanduser().absolute()
    hint = "expected a checkpoint folder <output_dir>/checkpoints/step-N (or resume=true for the newest one)"
    if not folder.exists():
        raise ConfigError(f"resume: {path} does not exist; {hint}")
    if not folder.is_dir():
        raise ConfigError(f"resume: {path} is a file; {hint}")
    if folder.name.endswith(".tmp"):
        raise ConfigError(f"resume: {path} is an incomplete checkpoint (a run died while writing it); {hint}")
    if not (folder / "trainer_state.json").is_file():
        inside = latest_checkpoint(folder / "checkpoints")
        also = f" (it looks like a run folder: its newest checkpoint is {inside})" if inside else ""
        raise ConfigError(f"resume: {path} is not a checkpoint folder: it has no trainer_state.json{also}; {hint}")
    return folder


def source_dtype(model) -> torch.dtype | None:
    """The dtype the loaded model's own config.json names (`dtype`, or `torch_dtype` before
    transformers 5); None when it cannot be read (a model built in code)."""
    from transformers import PretrainedConfig

    try:
        values, _ = PretrainedConfig.get_config_dict(model.config._name_or_path)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    name = values.get("dtype") or values.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def held_out_means(backend: Backend, sums: dict[str, float]) -> dict[str, float]:
    """`{"count": n, name: sum}` of this rank's held-out items -> `{"eval/name": sum / n}` over all
    ranks (every rank sends the same keys, one with no items too)."""
    totals = backend.mean(sums)
    count = max(totals.pop("count"), 1e-9)
    return {f"eval/{key}": value / count for key, value in totals.items()}


class Trainer:
    config_class = BaseConfig
    cfg: BaseConfig
    backend: Backend

    def __init__(self, cfg: BaseConfig):
        """Checks what must hold before anything is loaded: the output folder and the resume."""
        self.cfg = cfg
        # resolved before anything reads it: every consumer takes this bool, and config.yaml records it
        self.precision = resolve_bf16(cfg.train.bf16)
        cfg.train.bf16 = self.precision.bf16
        out = Path(cfg.output_dir)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output_dir: {out} is a file; expected a folder (created when missing)")
        self.resume_changes = self.check_resume()
        check_trackers(cfg.train.report_to)  # a tracker's missing package fails now, not after loading
        self.pending_samples: dict[str, list[dict]] = {}  # sample tables for the run's logger, by name
        torch.manual_seed(cfg.seed)

    def step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def add_samples(self, name: str, rows: list[dict]) -> None:
        """Rows (one dict per sample, JSON values) for `<output_dir>/<name>.jsonl` and the trackers' table
        `name`, written at the current step by the run (samples from `step`, eval_samples from `evaluate`)."""
        self.pending_samples.setdefault(name, []).extend(rows)

    # keys a checkpoint cannot be resumed under once changed: its weights' shapes or meaning depend on them
    resume_fixed_keys: tuple[str, ...] = ("trainer", "model.path", "peft.type", "peft.r", "peft.target_modules",
                                          "peft.init_r")

    def check_resume(self) -> list[tuple[str, Any, Any]]:
        """(key, checkpoint's value, new value) of each config key changed since the checkpoint this run
        continues from (`self.resume_from`) was written; refuses a changed `resume_fixed_keys` key, a
        resume=PATH that is no checkpoint, and checkpoints without resume=true."""
        resume = self.cfg.resume
        self.resume_from = latest = (checkpoint_folder(resume) if isinstance(resume, str) and resume
                                     else latest_checkpoint(Path(self.cfg.output_dir) / "checkpoints"))
        if latest is None:
            return []
        if not resume:
            raise ConfigError(f"{self.cfg.output_dir} already holds checkpoints ({latest.name}): pass resume=true to "
                              f"continue it, or choose another output_dir")
        saved_path = latest / "config.yaml"
        if not saved_path.is_file():  # written before checkpoints held their config: the run's
            saved_path = latest.parent.parent / "config.yaml"
        saved = flatten(read_yaml(saved_path)) if saved_path.is_file() else {}
        state_path = latest / "trainer_state.json"
        try:
            saved["trainer"] = json.loads(state_path.read_text())["trainer"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{state_path}: cannot read the checkpoint's trainer ({e})") from None
        new = flatten(to_dict(self.cfg))
        changes = [(key, saved.get(key, "<absent>"), new.get(key, "<absent>")) for key in sorted(set(saved) | set(new))
                   if key != "resume" and saved.get(key, "<absent>") != new.get(key, "<absent>")]
        for key, old, value in changes:
            if key in self.resume_fixed_keys and key in saved:  # a key the saved config lacks is new in this version
                raise ConfigError(f"resume: {key} is {value!r} but the checkpoint {latest} was written with {old!r}; "
                                  f"it cannot continue under a changed {key} (set {key}={old} back, or choose "
                                  f"another output_dir)")
        return changes

    def start(self) -> None:
        pass

    def finish(self, out: Path) -> None:
        pass

    @property
    def max_steps(self) -> int:
        return self.cfg.train.max_steps

    updates_per_step = 1  # optimizer steps per trainer step (online: mini-batches x epochs)

    @property
    def total_updates(self) -> int:
        """Optimizer steps in the whole run (AdaLoRA's budget schedule is defined over them)."""
        return self.max_steps * self.updates_per_step

    def save_extra(self, folder: Path) -> None:
        """Checkpoint what the model and backend do not hold (PPO's critic); all ranks call."""

    def load_extra(self, folder: Path) -> None:
        pass

    # ---- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> None:
        """Written under `step-N.tmp` and renamed when complete: a killed run never leaves a broken one."""
        root = Path(self.cfg.output_dir) / "checkpoints"
        tmp, final = root / f"step-{step}.tmp", root / f"step-{step}"
        if self.backend.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.backend.barrier()
        with self.backend.gathered():
            if self.backend.is_main:
                self.model.save_pretrained(tmp)
        self.backend.save_state(tmp)
        self.save_extra(tmp)
        if self.backend.is_main:
            self.tokenizer.save_pretrained(tmp)
            save_config(self.cfg, tmp / "config.yaml")
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"step": step, "trainer": self.cfg.trainer, "world_size": self.backend.world_size,
                 "backend": self.backend.kind}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            limit = self.cfg.train.save_total_limit
            for old in checkpoints(root)[:-limit] if limit else []:  # only once the new one is complete
                shutil.rmtree(old)
        self.backend.barrier()

    def supersede_later_checkpoints(self, step: int) -> None:
        """resume=PATH: move output_dir's checkpoints past `step` aside (main rank; see the module doc)."""
        for later in checkpoints(Path(self.cfg.output_dir) / "checkpoints"):
            if int(later.name[5:]) > step:
                aside = later.with_name(f"{later.name}.superseded")
                n = 1
                while aside.exists():
                    n += 1
                    aside = later.with_name(f"{later.name}.superseded-{n}")
                later.rename(aside)
                log.warning("resume: %s is past the resumed checkpoint (step %d): moved aside to %s", later, step,
                            aside.name)

    def load_checkpoint(self, folder: Path) -> int:
        if self.backend.deepspeed is None:
            from safetensors.torch import load_file

            if self.cfg.peft.type == "lora":
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(self.model, load_file(folder / "adapter_model.safetensors"))
            elif self.cfg.peft.type == "none":  # AdaLoRA's full-rank adapters come with the backend state
                state = load_file(folder / "model.safetensors")
                missing, unexpected = self.model.load_state_dict(state, strict=False)
                tied = set(getattr(self.model, "_tied_weights_keys", None) or {})
                if unexpected or set(missing) - tied - {"lm_head.weight"}:
                    raise RuntimeError(f"{folder}: checkpoint does not match the model ({missing or unexpected})")
        self.backend.load_state(folder)
        self.load_extra(folder)
        return json.loads((folder / "trainer_state.json").read_text())["step"]

    def save_final(self) -> Path:
        """Written under `final.tmp` and renamed when complete, as checkpoints are."""
        out = Path(self.cfg.output_dir) / "final"
        tmp = out.with_name("final.tmp")
        if self.backend.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        base = hf_model(self.model)
        dtype = source_dtype(base)
        with self.backend.gathered():
            state = merged_state_dict(self.model)
            if self.backend.is_main:
                if dtype is not None and dtype != torch.float32:  # the master weights are fp32
                    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
                base.save_pretrained(tmp, state_dict=state)
                if dtype is not None:  # save_pretrained records the in-memory (fp32) dtype
                    trained_dtype, base.config.dtype = base.config.dtype, dtype
                    base.config.save_pretrained(tmp)
                    base.config.dtype = trained_dtype
                self.tokenizer.save_pretrained(tmp)
                if self.cfg.peft.type != "none":
                    self.model.save_pretrained(tmp / "adapter")
        self.backend.barrier()
        if self.backend.is_main:
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        self.backend.barrier()
        return out

    # ---- the run -----------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        cfg = self.cfg
        out = Path(cfg.output_dir)
        latest = self.resume_from
        start = 0
        if self.backend.is_main:
            self.precision.log()
            for key, old, new in self.resume_changes:
                if key == "train.bf16":  # e.g. resumed on another CPU kind under train.bf16: auto
                    log.warning("resume: the checkpoint was trained in %s, this run continues in %s (%s)",
                                "bf16" if old is True else "fp32", self.precision.name, self.precision.reason)
                else:
                    log.info("resume: %s changed: %r (checkpoint) -> %r (used from now on)", key, old, new)
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")  # what this run uses, resumed or not
        if latest is not None:
            if self.backend.is_main and isinstance(cfg.resume, str):
                self.supersede_later_checkpoints(json.loads((latest / "trainer_state.json").read_text())["step"])
            self.backend.barrier()
            start = self.load_checkpoint(latest)
            log.info("resumed from %s", latest)
        self.start_step = start  # trainer steps behind the weights the run starts from
        self.start()
        total = self.max_steps
        logger = RunLogger(out, self.backend.is_main, start, total, cfg.train.report_to, to_dict(cfg))

        def write_samples(step: int) -> None:
            for name, rows in self.pending_samples.items():
                logger.samples(name, step, rows)
            self.pending_samples = {}

        first_eval = {}
        self.pending_samples = {}
        if start == 0:
            first_eval = self.evaluate()
            if first_eval:
                logger.log(0, first_eval, advance=False)
            write_samples(0)
            if "eval/accuracy" in first_eval:
                log.info("held-out accuracy before training: %.3f", first_eval["eval/accuracy"])
        metrics: dict[str, float] = {}
        for step in range(start, total):
            # every step's metrics go to the logger, which writes their mean at each log_every point
            logger.add({**self.step(step), **self.backend.stats()})
            done = step + 1
            evals = {}
            if done == total or (cfg.train.eval_every and done % cfg.train.eval_every == 0):
                evals = self.evaluate()  # logged at the step it is computed, never averaged
            if done % cfg.train.log_every == 0 or done == total:
                metrics = logger.flush(done, evals)
            elif evals:
                logger.log(done, evals, advance=False)
            write_samples(done)
            if done == total or (cfg.train.save_every and done % cfg.train.save_every == 0):
                self.save_checkpoint(done)
        logger.close()
        final = self.save_final()
        self.finish(out)
        if self.backend.is_main:
            plot_report(out / "metrics.jsonl", out / "report.png", title=f"{cfg.trainer}: {cfg.output_dir}")
            if "eval/accuracy" in metrics:
                before = f"{first_eval['eval/accuracy']:.3f} -> " if "eval/accuracy" in first_eval else ""
                log.info("held-out accuracy: %s%.3f", before, metrics["eval/accuracy"])
            log.info("model: %s   report: %s   metrics: %s", final, out / "report.png", out / "metrics.jsonl")
        return metrics
