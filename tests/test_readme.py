"""Every command line in the README's code blocks runs as written.

The README's `align` / `python -m alignment` / `accelerate launch` / `torchrun` / `deepspeed` lines and
its `make demo` (not `make test`: this suite) are read from the file (so the README cannot drift from
what runs) and run in order, in a scratch folder that holds the repository's configs/, launch/ and
data/, as a reader would run them: later commands use earlier outputs (the Think-RM RL stage reads the
SFT stage's model, routed RL and `serve-rm --routing` the preference model, `serve-rm` the reward model). The only change is overrides
appended to each `align train` that shrink it (`shrink` below): a tiny model instead of SmolLM2-135M,
one step (two for a resume), few samples, short generations. The judge the routing config names
(127.0.0.1:8001) is the rule judge of tests/support/judge_server.py; `serve-rm` lines are started, queried and
stopped with SIGINT.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from alignment.config import merge, parse_overrides
from tests.support import REPO
from tests.support.tiny_models import tiny_llama
from tests.support.judge_server import start_judge_server
from tests.support.recipes import run_two_nodes

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
LAUNCHERS = {"align", "python", "accelerate", "torchrun", "deepspeed", "make"}
SMOLLM2 = "builtin:smollm2-135m-instruct"


def readme_commands() -> list[tuple[dict, list[str]]]:
    """(environment assignments, words) of every command line in the README's code blocks."""
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", (REPO / "README.md").read_text(), re.M | re.S):
        for line in block.splitlines():
            first = next((w for w in line.split() if not re.fullmatch(r"[A-Z_]+=\S*", w)), None)
            if first not in LAUNCHERS:  # file listings and YAML beside the commands
                continue
            words = shlex.split(line, comments=True)
            env = {}
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            if words and words[0] in LAUNCHERS:
                commands.append((env, words))
    return commands


# `make test` / `make test-slow` are this suite itself
COMMANDS = [(env, words) for env, words in readme_commands()
            if words[:2] not in (["make", "test"], ["make", "test-slow"])]


def _recipe_values(words: list[str]) -> tuple[dict, bool]:
    """(the resolved recipe of an `... train CONFIG key=value ...` line, whether the line resumes)."""
    at = words.index("train")
    given = parse_overrides([w for w in words[at + 2:] if "=" in w])
    return merge(yaml.safe_load((REPO / words[at + 1]).read_text()), given), str(given.get("resume")).lower() == "true"


def shrink(values: dict, resumed: bool, tiny: Path) -> list[str]:
    """The overrides appended to a README `train` line: the same recipe, as small as it runs."""
    from alignment.online import OnlineTrainer
    from trainers import get_trainer

    extra = {"train.max_steps": 2 if resumed else 1, "train.epochs": 0, "train.save_every": 0, "train.eval_every": 0,
             "data.size": 16, "data.eval_size": 4, "data.eval_fraction": 0.05}
    if values.get("model", {}).get("path") == SMOLLM2:
        extra["model.path"] = tiny
    if issubclass(get_trainer(values["trainer"]), OnlineTrainer):
        extra.update({"rollout.n": 2, "rollout.max_new_tokens": 4})
    for section in ("rm", "dpo", "pm"):  # the HHH pairs are long: score their first tokens only
        if section in values:
            extra[f"{section}.max_length"] = 64
    if values["trainer"] == "sr_ppo":
        extra.update({"sft.data.size": 8, "sft.epochs": 1})
    if values["trainer"] == "think_rm_sft":
        # The next commands judge with this model, and pairwise RLHF stops when no verdict of a step
        # parses: enough steps for a tiny model from scratch to learn the answer format.
        extra.update({"train.max_steps": 40, "train.lr": 3e-3})
    if "judge" in values.get("reward", {}):
        extra["reward.judge.max_tokens"] = 48
    if values["trainer"] == "pairwise_rlhf":
        # The tiny Think-RM trained above knows only its word-worth questions: on the long HHH prompts it
        # babbles with no verdict (16 of 16 calls measured), and pairwise RLHF stops when no verdict of a
        # step parses. On the questions it learned, 2 of 16 calls gave none.
        extra["data.path"] = "data/think_rm/rl.jsonl"
    return [f"{key}={value}" for key, value in extra.items()]


def _executable(word: str) -> str:
    return sys.executable if word == "python" else str(BIN / word)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A scratch working folder with the repository's configs, launchers and data, a tiny model, and
    the rule judge on the port configs/judge_routing.yaml names."""
    folder = tmp_path_factory.mktemp("readme")
    for name in ("configs", "launch", "data"):
        (folder / name).symlink_to(REPO / name)
    tiny = tiny_llama(tmp_path_factory.mktemp("tiny-for-readme"))
    port = int(re.search(r":(\d+)/", yaml.safe_load((REPO / "configs/judge_routing.yaml").read_text())
                         ["reward"]["judge"]["base_url"]).group(1))
    _, judge = start_judge_server(port=port)
    try:
        with judge:
            yield folder, tiny
    finally:  # the servers README lines started in the background (`align vllm-serve ... &`)
        for proc in BACKGROUND:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


BACKGROUND: list[subprocess.Popen] = []


def _start_in_background(env: dict, words: list[str], cwd: Path, tiny: Path) -> None:
    """A README `align vllm-serve ... &` line: started on the tiny model (the shrunk runs after it train
    that model) and left running for the lines that use it; up once /health answers."""
    words = [str(tiny) if w == SMOLLM2 else w for w in words if w != "&"]
    port = int(words[words.index("--port") + 1])
    log = open(cwd / f"background-{port}.log", "w")
    proc = subprocess.Popen([_executable(words[0]), *words[1:]], cwd=cwd, env=_env(env), stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    BACKGROUND.append(proc)
    deadline = time.time() + 600
    while True:
        assert proc.poll() is None, (cwd / f"background-{port}.log").read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline, f"{' '.join(words)}: not up after 600 s"
        time.sleep(1)


def _env(extra: dict) -> dict:
    # the repository on the path, as an installed package is; no hub access, as on CI
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **extra}


def _serve_and_query(env: dict, words: list[str], cwd: Path) -> None:
    """Start a README `serve-rm` line, check its endpoints, stop it with SIGINT (exit 0)."""
    port = int(words[words.index("--port") + 1]) if "--port" in words else 8000
    key = env.get("ALIGN_RM_API_KEY")
    proc = subprocess.Popen([_executable(words[0]), *words[1:]], cwd=cwd, env=_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "serve-rm did not come up"
            time.sleep(0.3)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if key:
            assert httpx.post(f"{base}/v1/score", json={"prompts": ["a"], "responses": ["b"]}).status_code == 401
        if "--routing" in words:  # a preference model with a judge: every pair gets a probability
            reply = httpx.post(f"{base}/v1/compare", headers=headers, timeout=60, json={
                "prompts": ["Which words are better?"] * 2, "responses_a": ["7", "apple"], "responses_b": ["3", "9"]})
            assert reply.status_code == 200, reply.text
            assert len(reply.json()["prob_a"]) == 2 and all(0 <= p <= 1 for p in reply.json()["prob_a"])
        else:
            reply = httpx.post(f"{base}/v1/score", headers=headers, timeout=60,
                               json={"prompts": ["Hello?", "Hello?"], "responses": ["Hi there.", "Go away."]})
            assert reply.status_code == 200, reply.text
            assert len(reply.json()["rewards"]) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output[-3000:]


def _id(command: tuple[dict, list[str]]) -> str:
    env, words = command
    return " ".join([*(f"{k}={v}" for k, v in env.items()), *words])


def test_the_readme_has_commands_for_every_recipe():
    named = {w for _, words in COMMANDS for w in words if w.startswith("configs/") and w.endswith(".yaml")}
    recipes = {f"configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")} - {"configs/judge_routing.yaml"}
    assert recipes <= named, recipes - named
    assert any(words[:2] == ["make", "demo"] for _, words in COMMANDS)


def test_every_benchmark_the_readme_names_exists():
    """The prose's `align bench NAME` mentions (benchmarks take minutes each, so they are not run here;
    `benchmarks/RESULTS.md` has their figures and commands)."""
    names = set(re.findall(r"`align bench ([a-z_0-9]+)", (REPO / "README.md").read_text()))
    assert names and all((REPO / "benchmarks" / f"{name}.py").is_file() for name in names), names


@pytest.mark.parametrize("command", COMMANDS, ids=_id)
def test_readme_command_runs_as_written(command, sandbox):
    env, words = command
    folder, tiny = sandbox
    if words[0] == "make":  # `make demo` as written, one step long: the real SmolLM2 recipe, offline
        proc = subprocess.run(["make", *words[1:], "DEMO_STEPS=1", "DEMO_ARGS=data.eval_size=8"], cwd=REPO,
                              env=_env(env), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert "held-out accuracy" in proc.stdout + proc.stderr and (REPO / "runs/demo/report.png").is_file()
        return
    if "serve-rm" in words:
        _serve_and_query(env, words, folder)
        return
    if words[-1] == "&":
        _start_in_background(env, words, folder, tiny)
        return
    values, resumed = _recipe_values(words)
    args = [*words, *shrink(values, resumed, tiny)]
    rank_flag = next((flag for flag in ("--node_rank", "--machine_rank") if flag in words), None)
    if rank_flag:  # node 0's line of a two-node launch: node 1 runs it with its own rank, as the README says
        at = args.index("alignment")
        node1 = [*args[:at]]
        node1[node1.index(rank_flag) + 1] = "1"
        (code, output), (code1, output1) = run_two_nodes([[_executable(args[0]), *args[1:at]],
                                                          [_executable(node1[0]), *node1[1:]]],
                                                         args[at + 1:], _env(env), timeout=900, cwd=folder)
        assert code1 == 0, output1[-4000:]
    else:
        proc = subprocess.run([_executable(args[0]), *args[1:]], cwd=folder, env=_env(env), capture_output=True,
                              text=True, timeout=900)
        code, output = proc.returncode, proc.stdout + proc.stderr
    assert code == 0, output[-4000:]
    out = folder / values["output_dir"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in metrics if r["step"] > 0]
    assert steps and (out / "final" / "config.json").is_file(), steps
    if resumed:
        assert "resumed from" in output and steps[-1] == 2, (steps, output[-2000:])
    launches = {"accelerate": "--num_processes", "torchrun": "--nproc_per_node", "deepspeed": "--num_accelerators"}
    if rank_flag:  # two nodes of one process each
        assert "rank 0/2" in output, output[-3000:]
    elif words[0] in launches:  # a real world size, not one process per rank
        world = words[words.index(launches[words[0]]) + 1]
        assert f"rank 0/{world}" in output, output[-3000:]
