"""train.report_to trackers (tensorboard, wandb, mlflow, trackio, all offline), metrics averaged over
train.log_every, samples.jsonl / eval_samples.jsonl and response_length/clipped_frac."""

from __future__ import annotations

import glob
import json
import math
import sqlite3
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alignment.config import BaseConfig, ConfigError, load_config, to_dict
from alignment.logging import RunLogger, check_trackers, read_metrics
from alignment.online import OnlineTrainer, RolloutBatch, stopped_at_length
from alignment.rollout import Rollouts
from tests.support.recipes import run_align, toy_recipe

ALL = "train.report_to=[tensorboard,wandb,mlflow,trackio]"
# tiny steps: 2 prompts x 2 samples of 6 tokens; 3 steps logged every 2 (rows at 2: mean of 1-2, and 3)
TINY = ["train.max_steps=3", "train.log_every=2", "train.log_samples_every=1", "train.batch_size=2",
        "train.mini_batches=1", "rollout.n=2", "rollout.max_new_tokens=6"]


@pytest.fixture
def offline_env(monkeypatch):
    """Trackers in their default local places under output_dir, with no network."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "TRACKIO_DIR", "TRACKIO_PROJECT", "WANDB_DIR",
                 "WANDB_PROJECT", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}


def by_step(rows: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for row in rows:
        out.setdefault(row["step"], []).append(row)
    return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def wandb_records(path: Path) -> list:
    """The records of a wandb offline run file (run-<id>.wandb: a 7-byte header, then LevelDB log blocks
    of protobuf records), read without wandb's service."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # block padding
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def check_samples_and_means(out: Path) -> tuple[dict[int, dict], dict[int, list[dict]]]:
    """A TINY run's metrics.jsonl, samples.jsonl and eval_samples.jsonl agree; returns metrics and samples by step."""
    # metrics.jsonl: evaluation at 0 and 3, training rows at the log points 2 and 3
    metrics = {row["step"]: row for row in read_metrics(out / "metrics.jsonl")}
    assert sorted(metrics) == [0, 2, 3]
    assert set(metrics[0]) == {"step", "eval/reward"} and "eval/reward" in metrics[3]

    # samples.jsonl: every step's 4 samples; the logged metrics are the means over steps 1-2 of what they say
    samples = by_step(read_metrics(out / "samples.jsonl"))
    assert sorted(samples) == [1, 2, 3] and all(len(rows) == 4 for rows in samples.values())
    for row in samples[1]:
        assert {"prompt", "response", "reward", "reward/vowels", "advantage", "response_tokens",
                "finish_reason"} <= set(row)
        assert row["prompt"].startswith("Write a short sentence") and row["response_tokens"] <= 6
    per_step = {step: {"reward/mean": mean(r["reward"] for r in rows),
                       "response_length/mean": mean(r["response_tokens"] for r in rows),
                       "response_length/clipped_frac": mean(r["finish_reason"] == "length" for r in rows)}
                for step, rows in samples.items()}
    for key in per_step[1]:
        assert metrics[2][key] == pytest.approx(mean(per_step[s][key] for s in (1, 2)), rel=1e-5, abs=1e-7), key
        assert metrics[3][key] == pytest.approx(per_step[3][key], rel=1e-5, abs=1e-7), key
    rows = [r for step_rows in samples.values() for r in step_rows]
    assert all(r["finish_reason"] == "stop" or r["response_tokens"] == 6 for r in rows)
    assert any(r["finish_reason"] == "length" for r in rows)  # a random tiny model rarely says EOS

    # eval_samples.jsonl: the 8 held-out greedy responses of each evaluation, their reward averaging eval/reward
    evals = by_step(read_metrics(out / "eval_samples.jsonl"))
    assert sorted(evals) == [0, 3] and all(len(rows) == 8 for rows in evals.values())
    for step in (0, 3):
        assert mean(r["reward"] for r in evals[step]) == pytest.approx(metrics[step]["eval/reward"], abs=1e-6)
    return metrics, samples


def check_tensorboard(out: Path, metrics: dict[int, dict], samples: dict[int, list[dict]]) -> None:
    """The scalars at the log points, the config and the sample tables as text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    want = [(step, row["reward/mean"]) for step, row in sorted(metrics.items()) if "reward/mean" in row]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("reward/mean")] == want
    text = {tag: events.Tensors(tag) for tag in events.Tags()["tensors"]}
    assert [e.step for e in text["samples/text_summary"]] == sorted(samples)
    table = text["samples/text_summary"][0].tensor_proto.string_val[0].decode()
    first = min(samples)
    assert "| step | prompt | response |" in table and f"| {first} | {samples[first][0]['prompt']} |" in table
    assert "log_every: 2" in text["config/text_summary"][0].tensor_proto.string_val[0].decode()


def check_trackers_stored(out: Path, metrics: dict[int, dict], samples: dict[int, list[dict]], trackio_db: Path,
                          run_name: str = "out") -> None:
    """wandb, mlflow and trackio each hold the run's config (train.log_every = 2), the metrics of metrics.jsonl
    at their steps and the sample tables."""
    want = {step: row["reward/mean"] for step, row in metrics.items() if "reward/mean" in row}
    total = sum(len(rows) for rows in samples.values())
    ids = json.loads((out / "trackers.json").read_text())

    # wandb (offline): the records of every part of the run (a resume adds a folder with the same id)
    folders = sorted(glob.glob(str(out / "wandb" / f"offline-run-*-{ids['wandb']}")))
    assert folders
    records = [r for folder in folders for r in wandb_records(Path(folder) / f"run-{ids['wandb']}.wandb")]
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert {(run.display_name, run.project) for run in runs} == {(run_name, "alignment")}
    config = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    assert config["train"]["log_every"] == 2 and config["rollout"]["n"] == 2
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert {h["_step"]: h["reward/mean"] for h in history if "reward/mean" in h} == pytest.approx(want)
    tables = [path for folder in folders
              for path in glob.glob(str(Path(folder) / "files" / "media" / "table" / "samples_*.table.json"))]
    assert len(tables) == len(samples)
    content = [json.loads(Path(path).read_text()) for path in tables]
    assert all(table["columns"][:3] == ["step", "prompt", "response"] for table in content)
    assert sorted(row[0] for table in content for row in table["data"]) == \
        sorted(r["step"] for rows in samples.values() for r in rows)

    # mlflow: the file store under output_dir, the flattened config as params, metric history, tables
    from mlflow.tracking import MlflowClient

    client = MlflowClient((out / "mlruns").resolve().as_uri())
    run = client.get_run(ids["mlflow"])
    assert run.info.run_name == run_name and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "alignment"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert run.data.params["train.log_every"] == "2" and run.data.params["rollout.n"] == "2"
    history = client.get_metric_history(ids["mlflow"], "reward/mean")
    assert {m.step: m.value for m in history} == pytest.approx(want) and len(history) == len(want)
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    table = json.loads((artifacts / "samples.json").read_text())
    assert table["columns"][:3] == ["step", "prompt", "response"] and len(table["data"]) == total

    # trackio: its SQLite store
    db = sqlite3.connect(trackio_db)
    try:
        configs = db.execute("select run_name, config from configs where run_name = ?", (run_name,)).fetchall()
        assert configs and json.loads(configs[0][1])["train.log_every"] == 2
        assert len({r for (r,) in db.execute("select run_id from metrics where run_name = ?", (run_name,))}) == 1
        logged = [(step, json.loads(blob)) for step, blob in
                  db.execute("select step, metrics from metrics where run_name = ? order by id", (run_name,))]
    finally:
        db.close()
    assert {step: m["reward/mean"] for step, m in logged if "reward/mean" in m} == pytest.approx(want)
    tables = [(step, m["samples"]) for step, m in logged if "samples" in m]
    assert [step for step, _ in tables] == sorted(samples) and tables[0][1]["_type"] == "trackio.table"
    first = min(samples)
    assert [row["response"] for row in tables[0][1]["_value"]] == [r["response"] for r in samples[first]]


def test_run_logs_means_samples_and_tensorboard(tmp_path, tiny_model):
    """A real tiny run with the default tracker: the averaging, samples, eval samples and clipped_frac."""
    from align.cli import main

    recipe = toy_recipe(tmp_path, tiny_model)
    out = tmp_path / "out"
    assert main(["train", str(recipe), f"output_dir={out}", *TINY]) == 0
    metrics, samples = check_samples_and_means(out)
    check_tensorboard(out, metrics, samples)
    assert not (out / "trackers.json").exists() and not (out / "mlruns").exists()


def test_trackers_store_config_metrics_and_tables(tmp_path, monkeypatch):
    """Each tracker of train.report_to, offline and without training: config, metrics and sample tables."""
    import sys

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_DIR", "WANDB_PROJECT", "TRACKIO_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the default file store sets (restored after)
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    out = tmp_path / "out"
    out.mkdir()
    config = to_dict(load_config(BaseConfig, {"train": {"log_every": 2}, "rollout": {"n": 2}}))
    logger = RunLogger(out, True, 0, 3, report_to=["tensorboard", "wandb", "mlflow", "trackio"], config=config)
    samples = {step: [{"step": step, "prompt": f"p{i}", "response": f"r{step}-{i}", "reward": 0.5 * i,
                       "reward/fmt": None if i else 1.0} for i in range(2)] for step in (1, 2, 3)}
    logger.log(0, {"eval/reward": 0.1}, advance=False)
    for step in (1, 2, 3):
        logger.add({"reward/mean": float(step), "loss": 1.0 / step})
        if step != 1:
            logger.flush(step)
        logger.samples("samples", step, [{k: v for k, v in row.items() if k != "step"} for row in samples[step]])
    logger.close()
    metrics = {row["step"]: row for row in read_metrics(out / "metrics.jsonl")}
    assert metrics[2]["reward/mean"] == 1.5 and metrics[3]["reward/mean"] == 3.0
    check_tensorboard(out, metrics, samples)
    import trackio.utils  # its folder: ours, unless this process imported trackio before

    check_trackers_stored(out, metrics, samples, trackio.utils.TRACKIO_DIR / "alignment.db")
    assert "trackio" in sys.modules


@pytest.mark.slow
def test_all_trackers_in_a_resumed_run(tmp_path, tiny_model, offline_env, monkeypatch):
    """`align train` with every tracker in its default local place, interrupted after step 2 and resumed:
    one run per tracker holds the config, metrics.jsonl's values and the sample tables; samples.jsonl
    lines past the checkpoint are dropped."""
    recipe = toy_recipe(tmp_path, tiny_model)
    out = tmp_path / "out"
    first = run_align("train", str(recipe), f"output_dir={out}", ALL, *TINY, "train.max_steps=2", env=offline_env)
    assert first.returncode == 0, first.stderr[-3000:]
    ids = json.loads((out / "trackers.json").read_text())
    with open(out / "samples.jsonl", "a") as f:  # as if the first part had gone on past its checkpoint
        f.write(json.dumps({"step": 3, "prompt": "stale", "response": "stale"}) + "\n")
    second = run_align("train", str(recipe), f"output_dir={out}", ALL, *TINY, "resume=true", env=offline_env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((out / "trackers.json").read_text()) == ids

    metrics = {row["step"]: row for row in read_metrics(out / "metrics.jsonl")}
    assert sorted(metrics) == [0, 2, 3] and "eval/reward" in metrics[2]  # the first part ended at step 2
    samples = by_step(read_metrics(out / "samples.jsonl"))
    assert sorted(samples) == [1, 2, 3] and "stale" not in {r["prompt"] for r in samples[3]}
    assert sorted(by_step(read_metrics(out / "eval_samples.jsonl"))) == [0, 2, 3]
    check_tensorboard(out, metrics, samples)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3.7+ reads a file store only when allowed
    check_trackers_stored(out, metrics, samples, out / "trackio" / "alignment.db")


# ---- fast unit checks ----------------------------------------------------------------------------------
def test_logger_writes_the_mean_of_the_steps_between_log_points(tmp_path):
    logger = RunLogger(tmp_path, True, 0, 4, report_to=[])
    logger.add({"loss": 1.0, "kl": 0.5})
    logger.add({"loss": 3.0, "kl": float("nan"), "only": 2.0})  # NaN is left out, as the logger always did
    assert logger.flush(2, {"eval/reward": 0.25}) == {"loss": 2.0, "kl": 0.5, "only": 2.0, "eval/reward": 0.25}
    logger.add({"loss": 5.0})
    logger.flush(3)
    logger.samples("samples", 2, [{"prompt": "p", "response": "r", "reward": None}])
    logger.samples("samples", 3, [{"prompt": "p", "response": "s", "reward": 1.0}])
    logger.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 2, "loss": 2.0, "kl": 0.5, "only": 2.0, "eval/reward": 0.25}, {"step": 3, "loss": 5.0}]
    assert [r["step"] for r in read_metrics(tmp_path / "samples.jsonl")] == [2, 3]

    RunLogger(tmp_path, True, 2, 4, report_to=[]).close()  # a resume from step 2 runs step 3 again
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2]
    assert read_metrics(tmp_path / "samples.jsonl") == [{"step": 2, "prompt": "p", "response": "r", "reward": None}]


def test_report_to_names_are_checked(monkeypatch):
    with pytest.raises(ConfigError, match=r"train.report_to\[1\].*'tensorboard' \| 'wandb' \| 'mlflow' \| "
                                          r"'trackio', got 'comet'"):
        load_config(BaseConfig, {"train": {"report_to": ["wandb", "comet"]}})
    assert load_config(BaseConfig, {}).train.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="unknown tracker 'neptune'; valid: tensorboard, wandb, mlflow, trackio"):
        check_trackers(["neptune"])

    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    check_trackers(["tensorboard", "wandb"])
    with pytest.raises(ConfigError, match=r"mlflow needs the mlflow package.*pip install -e \.\[trackers\]"):
        check_trackers(["wandb", "mlflow"])


def test_sample_rows_and_clipped_responses():
    rollouts = Rollouts(prompt_ids=[[1]] * 3, response_ids=[[5, 6, 7], [5, 2], [5, 6, 2]],
                        logprobs=[torch.zeros(3), torch.zeros(2), torch.zeros(3)])
    # without finish reasons: a full-length response that does not end with EOS (2) was cut
    assert stopped_at_length(rollouts, 3, eos_token_id=2) == [True, False, False]
    rollouts.finish_reasons = ["length", "stop", "length"]
    assert stopped_at_length(rollouts, 3, eos_token_id=2) == [True, False, True]

    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 1, 1]])
    batch = RolloutBatch(samples=[SimpleNamespace(prompt="a", answer=None), SimpleNamespace(prompt="b", answer=7),
                                  SimpleNamespace(prompt=[{"role": "user", "content": "c"}], answer=None)],
                         rollouts=rollouts, texts=["x", "y", "z"], inputs={}, mask=mask,
                         rewards=torch.tensor([1.0, 0.0, 0.5]),
                         advantages=torch.tensor([[1.0, 2, 3], [4, 4, 100], [0, 0, 3]]),  # per token
                         reward_parts={"fmt": torch.tensor([1.0, float("nan"), 0.0])})
    trainer = SimpleNamespace(cfg=SimpleNamespace(rollout=SimpleNamespace(max_new_tokens=3)),
                              tokenizer=SimpleNamespace(eos_token_id=2))
    rows = OnlineTrainer.sample_rows(trainer, batch, {"accuracy": [1.0, 0.0, 1.0]})
    assert rows[0] == {"prompt": "a", "response": "x", "reward": 1.0, "reward/fmt": 1.0, "advantage": 2.0,
                       "accuracy": 1.0, "response_tokens": 3, "finish_reason": "length"}
    assert rows[1]["answer"] == 7 and rows[1]["reward/fmt"] is None and rows[1]["advantage"] == 4.0
    assert rows[2]["prompt"] == [{"role": "user", "content": "c"}] and math.isclose(rows[2]["advantage"], 1.0)
    json.dumps(rows)  # JSON as they are
