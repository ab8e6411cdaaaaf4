"""A run's life around the trainer, without training: one home with no import cycle, the directory lock, what a
relaunch does (skip a finished run, refuse to append to an unfinished one without a checkpoint), checkpoint
retention across launches, and a sweep that leaves no process behind. The same with verl's real trainer:
tests/test_e2e_runs.py."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trainer_fixtures import REPO, cpu_overrides, marked_processes, tiny_assets  # noqa: F401  (fixture)
from verl_tre.runs import checkpoints, identity, lock, record, resume
from verl_tre.trainer import config_check, main_ppo, sweep

PACKAGE = REPO / "verl_tre"


def _module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """verl_tre modules ``path`` imports anywhere (function bodies included): ``from a.b import c`` names a.b.c when
    that is a module, else a.b. (The packages above a module are left out: an __init__ that re-exports its
    submodules is not a cycle of the design.)"""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module in modules and node.level == 0:
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
    return found


def test_the_run_home_imports_without_a_cycle():
    modules = _module_files()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    home = [name for name in modules if name.startswith("verl_tre.runs")]
    assert {"verl_tre.runs.identity", "verl_tre.runs.record", "verl_tre.runs.lock", "verl_tre.runs.checkpoints",
            "verl_tre.runs.resume", "verl_tre.runs.reading", "verl_tre.runs.tables", "verl_tre.runs.plots"} <= set(home)
    assert graph["verl_tre.runs"] == set(), "the package itself imports nothing (the trainer's workers import it)"
    starts = [*home, "verl_tre.tables", "verl_tre.plots", "verl_tre.trainer.main_ppo", "verl_tre.trainer.sweep"]
    # Depth-first search for a path back to a module still on the stack, over everything these reach.
    state: dict[str, str] = {}

    def visit(name, stack):
        state[name] = "open"
        for child in sorted(graph[name]):
            if state.get(child) == "open":
                cycle = stack[stack.index(child):] + [child]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if child not in state:
                visit(child, stack + [child])
        state[name] = "done"

    for name in starts:
        if name not in state:
            visit(name, [name])


def _launch_overrides(assets, run_dir, *extra):
    return cpu_overrides(assets, run_dir) + ["algorithm.adv_estimator=grpo", *extra]


def _config(assets, run_dir, *extra):
    config = main_ppo.compose_config(_launch_overrides(assets, run_dir, *extra))
    main_ppo.prepare(config, launching=True)
    return config


def _other_process(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True)


_HOLD = "import sys, time\nfrom verl_tre.runs import lock\nwith lock.hold(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n"
_TRY = ("import sys\nfrom verl_tre.runs import lock\nfrom verl_tre.trainer.config_check import ConfigError\ntry:\n"
        "    with lock.hold(sys.argv[1]):\n        print('free')\nexcept ConfigError:\n    print('busy')\n")


def _free_elsewhere(run_dir) -> bool:
    """Whether another process could take ``run_dir``'s lock now."""
    out = _other_process(_TRY, str(run_dir)).communicate(timeout=60)[0]
    return out.strip() == "free"


def test_a_live_launch_holds_its_directory_until_it_dies(tiny_assets, tmp_path, monkeypatch):
    import ray

    run_dir = tmp_path / "run"
    holder = _other_process(_HOLD, str(run_dir))
    try:
        assert holder.stdout.readline().strip() == "held"
        written = json.loads((run_dir / lock.LOCK_FILE).read_text())
        assert (written["host"], written["pid"]) == (socket.gethostname(), holder.pid)
        monkeypatch.setattr(main_ppo, "_run_trainer", lambda config: pytest.fail("the trainer must not start"))
        with pytest.raises(config_check.ConfigError) as refused:
            main_ppo.run(main_ppo.compose_config(_launch_overrides(tiny_assets, run_dir)))
        message = str(refused.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert "Wait for that run to end" in message and "trainer.experiment_name=<new name>" in message
        assert not ray.is_initialized()
    finally:
        holder.send_signal(signal.SIGKILL)  # as a crash or an OOM kill ends it: no clean-up runs
        holder.wait()
    assert _free_elsewhere(run_dir)


def test_the_lock_is_released_when_the_trainer_fails_and_is_not_taken_twice_in_one_process(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="trainer actor died"):
        with lock.hold(run_dir):
            assert not _free_elsewhere(run_dir)
            with pytest.raises(config_check.ConfigError, match="being written by another launch"):
                with lock.hold(run_dir):
                    pass
            raise RuntimeError("trainer actor died")  # what run_ppo raises when its TaskRunner is killed
    assert _free_elsewhere(run_dir)
    assert (run_dir / lock.LOCK_FILE).read_text() == ""  # no stale holder named


def _record_run(config, steps, finished=False, checkpoint=None):
    """A run directory as the trainer leaves it: run.json, metrics.jsonl with ``steps``, optionally a checkpoint
    and the finished mark (as the launch writes it when the trainer returns)."""
    run_dir = identity.run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    plain = OmegaConf.to_container(config)
    (run_dir / record.RUN_FILE).write_text(json.dumps(record.run_summary(plain)))
    with open(run_dir / record.METRICS_FILE, "w") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "time": 0.0, "metrics": {"x": 1.0}}) + "\n")
    if checkpoint is not None:
        (run_dir / f"global_step_{checkpoint}" / "actor").mkdir(parents=True)
        (run_dir / checkpoints.CHECKPOINT_TRACKER).write_text(str(checkpoint))
    if finished:
        record.mark_finished(run_dir, plain)
    return run_dir


def test_a_finished_run_is_reported_and_not_trained_again(tiny_assets, tmp_path, capsys, monkeypatch):
    config = _config(tiny_assets, tmp_path / "run")
    run_dir = _record_run(config, [1, 2], finished=True, checkpoint=2)
    assert json.loads((run_dir / record.RUN_FILE).read_text())["finished"]["step"] == 2
    monkeypatch.setattr(main_ppo, "_run_trainer", lambda config: pytest.fail("a finished run must not train"))
    main_ppo.run(main_ppo.compose_config(_launch_overrides(tiny_assets, run_dir)))
    assert "already finished at step 2: nothing to train" in capsys.readouterr().err
    assert record.logged_steps(run_dir) == [1, 2]
    # Asking for no more steps than it ran is the same; asking for more resumes from its checkpoint.
    assert resume.decide(_config(tiny_assets, run_dir, "trainer.total_training_steps=1")).action == "finished"
    longer = resume.decide(_config(tiny_assets, run_dir, "trainer.total_training_steps=3"))
    assert (longer.action, longer.step) == ("resume", 2)
    # Stopped after its last step was saved but before the launch marked it: finished too (verl would train a 3rd).
    stopped = _record_run(_config(tiny_assets, tmp_path / "stopped"), [1, 2], checkpoint=2)
    main_ppo.run(main_ppo.compose_config(_launch_overrides(tiny_assets, stopped)))
    assert "already finished at step 2" in capsys.readouterr().err
    assert json.loads((stopped / record.RUN_FILE).read_text())["finished"]["step"] == 2


def test_an_unfinished_run_without_a_checkpoint_is_not_appended_to(tiny_assets, tmp_path):
    config = _config(tiny_assets, tmp_path / "run", "trainer.total_training_steps=5")
    run_dir = _record_run(config, [1, 2, 3])
    with pytest.raises(config_check.ConfigError) as refused:
        resume.decide(config)
    message = str(refused.value)
    assert "logged steps up to 3 but saved no checkpoint" in message and f"delete {run_dir}" in message
    assert "trainer.save_freq=<N>" in message and "verl_tre.resume_anyway=true" in message
    # Finished, but asked to go further without a checkpoint to start from: refused too.
    _record_run(config, [1, 2], finished=True)
    with pytest.raises(config_check.ConfigError, match="finished at step 2 without saving a checkpoint"):
        resume.decide(_config(tiny_assets, run_dir, "trainer.total_training_steps=9"))
    # The explicit way out; and a run that logged nothing yet (it died starting up) simply starts again.
    assert resume.decide(_config(tiny_assets, run_dir, "trainer.total_training_steps=9",
                                 "verl_tre.resume_anyway=true")).action == "start"
    _record_run(config, [])
    assert resume.decide(config).action == "start"


def _checkpoint(run_dir: Path, step: int, *parts: str) -> Path:
    folder = run_dir / f"global_step_{step}"
    folder.mkdir(parents=True, exist_ok=True)
    for part in parts:
        (folder / part).mkdir()
    (folder / "data.pt").write_bytes(b"")
    return folder


def _on_disk(run_dir: Path) -> dict[int, list[str]]:
    return {step: sorted(p.name for p in folder.iterdir()) for step, folder in checkpoints.checkpoint_dirs(run_dir)}


def test_a_resumed_record_continues_after_a_line_cut_by_a_kill(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / record.METRICS_FILE).write_text('{"step": 1, "time": 0, "metrics": {}}\n{"step": 2, "ti')
    recorder = record.RunRecorder(run_dir, {"name": "r"})
    recorder.log({"a": 1.0}, step=2)
    recorder.close()
    assert [json.loads(line)["step"] for line in (run_dir / record.METRICS_FILE).read_text().splitlines()] == [1, 2]


def test_retention_keeps_the_newest_of_each_role_whoever_wrote_them(tmp_path):
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, 1)  # what verl's own retention leaves of a deleted checkpoint: data.pt only
    for step in (2, 10, 11):
        _checkpoint(run_dir, step, "actor", "critic")
    _checkpoint(run_dir, 12, "actor")
    assert checkpoints.prune(run_dir, {"actor": None, "critic": None}) == [] and len(_on_disk(run_dir)) == 5
    checkpoints.prune(run_dir, {"actor": 2, "critic": 1}, protect=run_dir / "global_step_2")
    assert _on_disk(run_dir) == {2: ["actor", "critic", "data.pt"], 11: ["actor", "critic", "data.pt"],
                                 12: ["actor", "data.pt"]}
    checkpoints.prune(run_dir, {"actor": 1, "critic": 1})
    assert _on_disk(run_dir) == {11: ["critic", "data.pt"], 12: ["actor", "data.pt"]}


def test_the_trainer_logger_prunes_after_every_step(tmp_path):
    from verl.utils import tracking

    record.install()
    run_dir = tmp_path / "run"
    config = {"verl_tre": {"task": "countdown", "model_size": None},
              "trainer": {"default_local_dir": str(run_dir), "max_actor_ckpt_to_keep": 2},
              "actor_rollout_ref": {"model": {"path": "m"}, "actor": {"entropy_coeff": 0.0}}}
    logger = tracking.Tracking("p", "e", default_backend=[], config=config)
    for step in (1, 2, 3):
        _checkpoint(run_dir, step, "actor")  # verl saves a step's checkpoint before it logs the step
        logger.log({"a": step}, step=step)
    assert sorted(_on_disk(run_dir)) == [2, 3]


def test_a_launch_prunes_before_resuming_and_keeps_what_it_resumes_from(tiny_assets, tmp_path, monkeypatch):
    keep_one = ("trainer.max_actor_ckpt_to_keep=1", "trainer.total_training_steps=9")
    config = _config(tiny_assets, tmp_path / "run", *keep_one)
    run_dir = _record_run(config, [1, 2, 3, 4], checkpoint=4)
    for step in (1, 2, 3):
        _checkpoint(run_dir, step, "actor")
    seen = []
    monkeypatch.setattr(main_ppo, "_run_trainer", lambda config: seen.append(sorted(_on_disk(run_dir))))
    main_ppo.run(main_ppo.compose_config(_launch_overrides(tiny_assets, run_dir, *keep_one)))
    assert seen == [[4]]  # the previous launches' checkpoints are gone before verl loads global_step_4
    assert json.loads((run_dir / record.RUN_FILE).read_text())["finished"]["step"] == 4
    # Resuming an older checkpoint on purpose: it stays, beside the newest.
    _checkpoint(run_dir, 2, "actor")
    seen.clear()
    older = f"trainer.resume_from_path={run_dir / 'global_step_2'}"
    main_ppo.run(main_ppo.compose_config(_launch_overrides(tiny_assets, run_dir, *keep_one, "trainer.resume_mode=resume_path",
                                                           older, "trainer.total_training_steps=10")))
    assert seen == [[2, 4]]


def test_a_tracker_naming_a_checkpoint_without_its_model_is_refused_before_ray(tiny_assets, tmp_path, monkeypatch):
    """One checkpoint kept and a save that died: verl deleted global_step_3's model, global_step_4 never got one."""
    config = _config(tiny_assets, tmp_path / "run", "trainer.max_actor_ckpt_to_keep=1", "trainer.total_training_steps=9")
    run_dir = _record_run(config, [1, 2, 3, 4], checkpoint=3)
    shutil.rmtree(run_dir / "global_step_3" / "actor")
    (run_dir / "global_step_3" / "data.pt").write_bytes(b"")
    _checkpoint(run_dir, 2, "actor")
    monkeypatch.setattr(main_ppo, "_run_trainer", lambda config: pytest.fail("the trainer must not start"))
    with pytest.raises(config_check.ConfigError, match=r"names global_step_3, which holds no actor checkpoint.*"
                                                         r"complete one \(step 2\)"):
        main_ppo.run(main_ppo.compose_config(_launch_overrides(tiny_assets, run_dir, "trainer.max_actor_ckpt_to_keep=1",
                                                               "trainer.total_training_steps=9")))


def test_a_value_the_name_is_made_of_is_checked_before_naming(tmp_path, monkeypatch, capsys):
    with pytest.raises(config_check.ConfigError, match=r"actor_rollout_ref\.actor\.entropy_coeff='1e-3x': must be a number"):
        main_ppo.prepare(main_ppo.compose_config(["trainer.device=cpu", "actor_rollout_ref.actor.entropy_coeff=1e-3x"]),
                         launching=False)
    monkeypatch.chdir(tmp_path)
    script = str(REPO / "experiments/countdown/1.5b_ppo.sh")
    assert sweep.main([script, "--set", "ENTROPY_COEFF=1e-3x", "--dry-run", "--", "trainer.device=cpu"]) == 2
    err = capsys.readouterr().err
    assert "actor_rollout_ref.actor.entropy_coeff='1e-3x'" in err and "Traceback" not in err


def test_a_sweep_rerun_skips_finished_runs(tiny_assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    script = str(REPO / "experiments/countdown/1.5b_ppo.sh")
    overrides = [o for o in _launch_overrides(tiny_assets, "unused") if not o.startswith("trainer.default_local_dir")]
    job = sweep.plan([script], {}, [1], overrides)[0]
    assert job.state == "starts" and not job.finished
    config = main_ppo.compose_config(sweep.script_overrides(script, {}, job.overrides))
    main_ppo.prepare(config, launching=False)
    _record_run(config, [1, 2], finished=True)
    monkeypatch.setattr(sweep.process_tree, "become_subreaper", lambda: True)
    monkeypatch.setattr(sweep.process_tree, "run", lambda *a, **k: pytest.fail("a finished run must not relaunch"))
    assert sweep.main([script, "--", *overrides]) == 0
    out = capsys.readouterr().out
    assert f"run 1/1 skipped, finished at step 2: nothing to train: {job.run_dir}" in out


_LEAVER = """
import subprocess, sys, time
from verl_tre.utils import process_tree
process_tree.become_subreaper()
# A child that starts a daemon of its own (new session, deaf to SIGINT and SIGTERM), as Ray's agents behave.
child = "setsid bash -c 'trap \\"\\" INT TERM; while sleep 0.2; do :; done' & sleep 600"
print("started", flush=True)
try:
    process_tree.run(["bash", "-c", child], env=dict(__import__("os").environ), interrupt_grace_s=5, leftover_grace_s=1)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_on_a_child_run_ends_everything_it_started(tmp_path):
    mark = f"VERL_TRE_TEST_MARK={os.getpid()}_{time.monotonic_ns()}"
    name, value = mark.split("=")
    env = {**os.environ, "PYTHONPATH": str(REPO), name: value}
    parent = subprocess.Popen([sys.executable, "-c", _LEAVER], env=env, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    assert parent.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 30
    while len(marked_processes(mark)) < 3 and time.monotonic() < deadline:  # the parent, the child and its daemon
        time.sleep(0.1)
    assert len(marked_processes(mark)) >= 3
    os.killpg(parent.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
    out = parent.communicate(timeout=60)[0]
    assert "interrupted" in out
    assert marked_processes(mark) == []
