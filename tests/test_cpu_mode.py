"""CPU mode: config adjustments only with trainer.device=cpu, refusal on other verl versions, Ray resources, and
the worker patches (checked in a fresh interpreter: they change process-wide state)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from trainer_fixtures import REPO
from verl_tre.trainer import main_ppo
from verl_tre.utils import cpu_mode


def test_adjustments_apply_only_in_cpu_mode():
    gpu = main_ppo.compose_config(["method=tre_k"])
    before = OmegaConf.to_container(gpu)
    assert cpu_mode.adjust_config(gpu) == [] and OmegaConf.to_container(gpu) == before

    cpu = main_ppo.compose_config(["method=tre_k", "trainer.device=cpu"])
    notes = cpu_mode.adjust_config(cpu)
    for key, value, reason in cpu_mode._CONFIG_ADJUSTMENTS:
        assert OmegaConf.select(cpu, key) == value, key
    changed = {note.split(":")[0] for note in notes}
    assert "actor_rollout_ref.rollout.name" in changed and "actor_rollout_ref.actor.strategy" in changed
    assert all("(" in note and "->" in note for note in notes)  # each change names old, new and reason
    # Nothing else moves: the method's settings survive.
    assert cpu.actor_rollout_ref.actor.trust_region.mode == "top_k"
    assert cpu_mode.adjust_config(cpu) == []  # idempotent


def test_other_verl_versions_are_refused(monkeypatch):
    import verl

    monkeypatch.setattr(verl, "__version__", "0.5.0")
    config = main_ppo.compose_config(["trainer.device=cpu"])
    with pytest.raises(RuntimeError, match=r"verl==0\.4\.1 only, found verl 0\.5\.0"):
        cpu_mode.adjust_config(config)
    with pytest.raises(RuntimeError, match="trainer.device=cuda"):
        cpu_mode.apply_worker_patches()
    assert cpu_mode.adjust_config(main_ppo.compose_config([])) == []  # GPU runs are not affected


def test_ray_resources_stand_in_for_gpus():
    config = main_ppo.compose_config(["trainer.device=cpu", "trainer.n_gpus_per_node=2"])
    kwargs = cpu_mode.ray_init_kwargs(config)
    assert kwargs["num_gpus"] == 2 and kwargs["resources"] == {"cpu": 2}
    assert kwargs["num_cpus"] >= 3  # two workers and verl's TaskRunner


def test_backend_string_collapses_to_one_backend():
    seen = {}
    init = cpu_mode._single_backend_init(lambda **kw: seen.update(kw))
    init(backend="cpu:gloo,cpu:gloo", rank=0)
    assert seen == {"backend": "gloo", "rank": 0}
    init(backend="cpu:gloo,cuda:nccl")
    assert seen["backend"] == "cpu:gloo,cuda:nccl"  # a real mixed spec is left alone


WORKER_CHECK = textwrap.dedent(
    """
    import socket, sys, tempfile
    import torch
    from omegaconf import OmegaConf
    from tensordict import TensorDict
    from verl import DataProto
    from verl_tre.trainer.main_ppo import hide_trl_without_value_head
    from verl_tre.utils import cpu_mode, local_assets

    cpu_mode.apply_worker_patches()
    cpu_mode.apply_worker_patches()  # idempotent: wrappers are not stacked

    # torch.cpu stand-ins verl's memory logging, cache clearing and checkpointed RNG need.
    assert torch.cpu.memory_allocated() == 0 and torch.cpu.max_memory_reserved() == 0
    free, total = torch.cpu.mem_get_info()
    assert 0 < free <= total
    state = torch.cpu.get_rng_state(); a = torch.rand(3); torch.cpu.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))
    torch.cpu.empty_cache(); assert isinstance(torch.cpu.get_device_name(), str)

    # verl's actor worker asks for "cpu:gloo,<device>:<nccl backend>".
    import verl.utils.device as device, verl.workers.fsdp_workers as fsdp_workers
    assert device.get_nccl_backend() == fsdp_workers.get_nccl_backend() == "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    torch.distributed.init_process_group(backend="cpu:gloo," + device.get_device_name() + ":" + device.get_nccl_backend(),
                                         rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    x = torch.ones(2); torch.distributed.all_reduce(x); assert x.tolist() == [1.0, 1.0]
    torch.distributed.destroy_process_group()

    assert fsdp_workers.CPUOffloadPolicy(pin_memory=True).pin_memory is False
    from verl.workers.sharding_manager.base import BaseShardingManager
    assert BaseShardingManager().timing == {}

    root = tempfile.mkdtemp()
    tok = local_assets.train_bpe_tokenizer(["abc def ghi"] * 10, root + "/tok", vocab_size=280)
    model_dir = local_assets.tiny_qwen2(root + "/m", tok, hidden_size=16, num_layers=1, num_heads=2,
                                        num_kv_heads=1, intermediate_size=32)

    import verl.utils.model as verl_model
    critic = verl_model.load_valuehead_model(str(model_dir), torch.float32,
                                             __import__("transformers").AutoConfig.from_pretrained(model_dir, num_labels=1), False)
    assert critic.config._attn_implementation == "sdpa"

    # HF rollout: greedy responses equal transformers' own generate on the same left-padded prompts.
    from transformers import AutoModelForCausalLM
    from verl.workers.rollout.hf_rollout import HFRollout
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[0, 0, 5, 9, 12], [7, 8, 9, 10, 11]]); mask = (ids != 0).long()
    mask[1] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    config = OmegaConf.create({"do_sample": False, "response_length": 6, "temperature": 1.0, "top_p": 1.0,
                               "top_k": -1, "n": 1, "val_kwargs": {}})
    rollout = HFRollout(model, config)
    batch = DataProto(batch=TensorDict({"input_ids": ids, "attention_mask": mask, "position_ids": positions},
                                       batch_size=2), meta_info={"eos_token_id": -1, "pad_token_id": 0})
    out = rollout.generate_sequences(batch)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6, min_new_tokens=6,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(out.batch["responses"], ref[:, 5:]), (out.batch["responses"], ref[:, 5:])

    # Remove-padding: verl's actor and critic modules have the padding helpers, and a packed SDPA forward (one
    # row, position_ids restarting per sequence, verl's apply_monkey_patch applied) gives each sequence the
    # logits of its padded forward, i.e. no attention across sequences.
    import verl.workers.actor.dp_actor as verl_dp_actor, verl.workers.critic.dp_critic as verl_dp_critic
    from verl.models.transformers.monkey_patch import apply_monkey_patch
    assert all(callable(getattr(m, n)) for m in (verl_dp_actor, verl_dp_critic)
               for n in ("unpad_input", "pad_input", "index_first_axis", "rearrange"))
    hide_trl_without_value_head()  # as the worker setup hook does before verl's monkey patch imports trl
    apply_monkey_patch(model, use_remove_padding=True)
    seqs = [[5, 9, 12, 7, 3, 4, 6], [8, 2, 11], [10, 4, 4, 9, 1]]
    width = max(map(len, seqs))
    padded_ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    padded_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        padded = model(input_ids=padded_ids, attention_mask=padded_mask, use_cache=False).logits
        packed = model(input_ids=torch.tensor([sum(seqs, [])]), attention_mask=None, use_cache=False,
                       position_ids=torch.tensor([sum((list(range(len(s))) for s in seqs), [])])).logits
    start = 0
    for i, s in enumerate(seqs):
        torch.testing.assert_close(packed[0, start:start + len(s)], padded[i, :len(s)], rtol=1e-5, atol=1e-5)
        start += len(s)

    import trl, verl.models.transformers.monkey_patch as mp
    hide_trl_without_value_head()
    assert mp.is_trl_available() == verl_model.is_trl_available() == hasattr(trl, "AutoModelForCausalLMWithValueHead")
    print("ok")
    """
)


def test_worker_patches_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-c", WORKER_CHECK], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_compute_dtype_option_is_validated_and_reaches_the_workers():
    from verl_tre.trainer.config_check import ConfigError

    config = main_ppo.compose_config(["trainer.device=cpu"])
    assert config.verl_tre.cpu_compute_dtype == "fp32"
    env = cpu_mode.worker_env(config)
    assert (env[cpu_mode.ENV_FLAG], env[cpu_mode.DTYPE_ENV]) == ("1", "fp32")
    notes = cpu_mode.adjust_config(config)
    assert config.actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype == "fp32"
    assert config.actor_rollout_ref.ref.fsdp_config.model_dtype == "fp32"
    assert any("cpu_compute_dtype=fp32" in note for note in notes)

    bf16 = main_ppo.compose_config(["trainer.device=cpu", "verl_tre.cpu_compute_dtype=bf16"])
    cpu_mode.adjust_config(bf16)  # verl's own precision settings: nothing dtype-related is added
    assert OmegaConf.select(bf16, "actor_rollout_ref.actor.fsdp_config.mixed_precision") is None
    assert OmegaConf.select(bf16, "actor_rollout_ref.ref.fsdp_config.model_dtype") is None
    assert cpu_mode.worker_env(bf16)[cpu_mode.DTYPE_ENV] == "bf16"

    assert cpu_mode.worker_env(main_ppo.compose_config([])) == {}  # GPU runs: no CPU-mode environment
    for device in ("cpu", "cuda"):
        bad = main_ppo.compose_config([f"trainer.device={device}", "verl_tre.cpu_compute_dtype=fp16"])
        with pytest.raises(ConfigError, match=r"verl_tre.cpu_compute_dtype='fp16'.*Fix: fp32"):
            cpu_mode.adjust_config(bad)


# verl's real FSDP worker, built in this process as a Ray worker would build it (one rank, gloo), with forward
# hooks recording the dtype of a decoder layer's MLP output during rollout, compute_log_prob, the reference's
# log-probs, update_actor and the critic's values.
DTYPE_CHECK = textwrap.dedent(
    """
    import json, os, socket, sys, tempfile
    from pathlib import Path
    dtype = sys.argv[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    os.environ.update({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "DIST_INIT_METHOD": f"tcp://127.0.0.1:{port}"})
    sys.path.insert(0, "tests")
    import torch
    from tensordict import TensorDict
    from verl import DataProto
    from trainer_fixtures import build_tiny_assets, cpu_overrides
    from verl_tre.trainer import main_ppo

    root = Path(tempfile.mkdtemp())
    assets = build_tiny_assets(root)
    config = main_ppo.compose_config(cpu_overrides(assets, root / "run") + [
        "method=tre_k", "actor_rollout_ref.actor.entropy_coeff=0.01", f"verl_tre.cpu_compute_dtype={dtype}"])
    main_ppo.prepare(config, launching=True)
    os.environ.update(main_ppo._job_env(config))  # what Ray gives every worker process
    main_ppo.setup_worker_process()
    from verl.workers.fsdp_workers import ActorRolloutRefWorker, CriticWorker

    worker = ActorRolloutRefWorker(config.actor_rollout_ref, role="actor_rollout_ref")
    worker.init_model()
    critic = CriticWorker(config.critic)
    critic.init_model()
    seen = {}
    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, set()).add(str(out.dtype).replace("torch.", ""))
        return hook
    for name, model in (("actor", worker.actor_module_fsdp), ("ref", worker.ref_module_fsdp),
                        ("critic", critic.critic_module)):
        model.model.layers[0].mlp.register_forward_hook(record(name))

    def stage(name):
        seen["stage"] = name
        for key in ("actor", "ref", "critic"):
            seen.pop(key, None)

    ids = torch.tensor([[0, 0, 5, 9, 12, 7], [7, 8, 9, 10, 11, 4], [0, 6, 5, 9, 3, 2], [0, 0, 0, 4, 5, 6]])
    mask = (torch.arange(6) >= torch.tensor([[2], [0], [1], [3]])).long()
    prompts = DataProto(batch=TensorDict({"input_ids": ids, "attention_mask": mask,
                                          "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}, batch_size=4),
                        meta_info={"eos_token_id": -1, "pad_token_id": 0, "do_sample": True})
    result = {}
    stage("rollout"); data = worker.generate_sequences(prompts); result["rollout"] = sorted(seen["actor"])
    stage("log_prob"); old = worker.compute_log_prob(data); result["compute_log_prob"] = sorted(seen["actor"])
    stage("ref"); ref = worker.compute_ref_log_prob(data); result["ref"] = sorted(seen["ref"])
    data = data.union(old)
    rows, n = data.batch["responses"].shape
    data.batch["advantages"] = torch.linspace(-1, 1, rows)[:, None].expand(rows, n).contiguous()
    data.meta_info.update({"temperature": 1.0, "global_token_num": [int(data.batch["attention_mask"].sum())]})
    stage("update"); metrics = worker.update_actor(data); result["update_actor"] = sorted(seen["actor"])
    stage("values"); critic.compute_values(data); result["critic"] = sorted(seen["critic"])
    result["torch_autocast"] = torch.autocast.__module__
    print(json.dumps(result))
    """
)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cpu_mode_computes_in_the_configured_dtype(dtype):
    """fp32 by default in every role (the demo's 16x); bf16 when asked, i.e. verl's own autocast, untouched."""
    import json

    out = subprocess.run([sys.executable, "-c", DTYPE_CHECK, dtype], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    want = {"fp32": ["float32"], "bf16": ["bfloat16"]}[dtype]
    for role in ("rollout", "compute_log_prob", "ref", "update_actor", "critic"):
        assert result[role] == want, (role, result)
    assert (result["torch_autocast"] == "torch.amp.autocast_mode") == (dtype == "bf16")


def test_workers_compute_on_the_cores_shared_out_among_them(monkeypatch):
    """Ray would force OMP_NUM_THREADS=1 in verl's workers (created without num_cpus): one worker on one core."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_mode.os, "cpu_count", lambda: 8)
    for workers, threads in ((1, 8), (2, 4), (3, 2), (16, 1)):
        config = main_ppo.compose_config(["trainer.device=cpu", f"trainer.n_gpus_per_node={workers}"])
        assert cpu_mode.worker_env(config)["OMP_NUM_THREADS"] == str(threads)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins
    assert cpu_mode.worker_env(main_ppo.compose_config(["trainer.device=cpu"]))["OMP_NUM_THREADS"] == "3"
