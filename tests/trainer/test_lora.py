"""LoRA: adapters train under DeepSpeed, ship alone, and a worker's merge equals the trainer's merged model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.hub import WORKER, start_hub, write_config

from rl.config import LoraConfig, ModelConfig, TrainerConfig
from rl.trainer.lora import apply_lora
from rl.weights.lora import adapter_metadata, merge_adapter, merged_state_dict, split_state

LORA = LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["norm"])


def lora_model(model_dir, seed=0):
    """The tiny model with adapters whose B is random (peft starts B at 0, which would merge to nothing)."""
    from transformers import AutoModelForCausalLM

    model = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), LORA)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "modules_to_save" in name:  # the trained copy of a norm
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_merge_matches_peft(tiny_model_dir):
    """Our merge (what workers run) gives peft's merge_and_unload weights under the model's own names."""
    model = lora_model(tiny_model_dir)
    # The modules peft trains in full: which names `norm` matches is peft's rule (every `*norm` in the releases
    # this test was written against, only the module named `norm` in 0.22.0), so it is read off the model.
    saved = {name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
             for name, _ in model.named_parameters() if "modules_to_save" in name}  # fmt: skip
    ours = merged_state_dict(model.state_dict(), LORA.alpha / LORA.r)
    theirs = model.merge_and_unload().state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    plain = load_plain(tiny_model_dir)
    changed = {name for name in plain if not torch.equal(ours[name], plain[name])}
    linear = {f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj",
                                                                       "mlp.down_proj")}  # fmt: skip
    assert "model.norm.weight" in saved and changed == linear | saved


_PLAIN: dict = {}


def load_plain(model_dir):
    from safetensors.torch import load_file

    if model_dir not in _PLAIN:
        _PLAIN[model_dir] = load_file(Path(model_dir) / "model.safetensors")
    return _PLAIN[model_dir]


def test_merge_refuses_what_does_not_fit(tiny_model_dir):
    base, adapters = split_state(lora_model(tiny_model_dir).state_dict())
    name = next(k for k in adapters if k.endswith("lora_A"))
    bad = dict(adapters) | {name: adapters[name][:, :-1]}
    with pytest.raises(ValueError, match="does not fit"):
        merge_adapter(base, bad, 2.0)
    with pytest.raises(ValueError, match="needs lora_A, lora_B"):
        merge_adapter({}, {k: v for k, v in adapters.items() if "lora_" in k}, 2.0)
    with pytest.raises(ValueError, match="saved module weight .* does not fit"):
        merge_adapter({}, adapters, 2.0)


@pytest.mark.parametrize("stage", [0, 3])
def test_strategy_trains_adapters_only(tiny_model_dir, stage):
    """Under DeepSpeed only adapter parameters train; the gathered state is the merged model under HF names,
    equal to merging the gathered adapters into the unchanged base."""
    from rl.trainer.strategy import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(
        ModelConfig(name=str(tiny_model_dir)),
        TrainerConfig(zero_stage=stage, lr=1e-2, threads=1, micro_batch_size=4, lora=LORA),
    )
    trainable = [n for n, p in strategy.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 400, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    for _ in range(3):
        logp, _ = strategy.token_logprobs(ids, mask)
        strategy.backward(-logp.sum() / logp.numel())
        strategy.step()
    merged = strategy.gather_state_dict()
    adapters = strategy.gather_adapter_state()
    strategy.close()
    plain = load_plain(tiny_model_dir)
    assert set(merged) == set(plain)
    assert any(not torch.equal(merged[k], plain[k]) for k in plain)  # training moved the merged weights
    expected = merge_adapter(plain, adapters, LORA.alpha / LORA.r)
    for name in plain:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.slow
def test_worker_merges_lora_version_from_a_real_hub(tiny_model_dir, tmp_path):
    """A worker fetching a `lora` version downloads only the adapter file (KBs next to the full base it
    already has) and ends with exactly the trainer's merged weights; a lying adapter fails loudly."""
    from safetensors.torch import load_file

    from rl.weights.store import read_manifest, write_base, write_lora_version, write_version
    from rollout_workers.client import HubClient
    from rollout_workers.weight_sync import WeightSync, WeightSyncError

    run_dir = tmp_path / "run"
    policy = run_dir / "policy"
    write_base(policy, tiny_model_dir)
    write_version(policy, 0, load_plain(tiny_model_dir), "float32")
    model = lora_model(tiny_model_dir, seed=1)
    base, adapters = split_state(model.state_dict())
    write_lora_version(policy, 1, adapters, adapter_metadata(LORA, 1), base_version=0)
    trainer = {"prompts_per_step": 2, "micro_batch_size": 4, "lora": LORA.model_dump()}
    config = write_config(run_dir, tiny_model_dir, weights={"format": "lora"}, trainer=trainer)
    hub = start_hub(config, tmp_path / "hub.log")
    try:
        with HubClient(hub.url, WORKER, max_retry_s=10) as client:
            sync = WeightSync(client, tmp_path / "cache")
            base_policy = sync.fetch(client.policy(0))
            before = sync.bytes_downloaded
            manifest = client.policy()
            assert manifest.format == "lora" and manifest.lora_base_version == 0
            local = sync.fetch(manifest)
            adapter_bytes = sync.bytes_downloaded - before
            assert adapter_bytes == sum(f.size for f in manifest.files)
            assert adapter_bytes < 0.2 * sum(p.stat().st_size for p in base_policy.weight_files)
            merged = load_file(local.weight_files[0])
            expected = model.merge_and_unload().state_dict()
            assert set(merged) == set(load_plain(tiny_model_dir))  # tied lm_head stored once, as in the base
            for name, tensor in merged.items():
                torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-6, msg=name)
            assert (local.model_dir / "config.json").is_file()  # a loadable HF directory

            # An adapter that does not fit the base: a clear error, no half-merged version left as complete.
            name = next(k for k in adapters if k.endswith("lora_B"))
            bad = dict(adapters) | {name: torch.zeros(adapters[name].shape[0] + 1, adapters[name].shape[1])}
            write_lora_version(policy, 2, bad, adapter_metadata(LORA, 2), base_version=0)
            with pytest.raises(WeightSyncError, match="does not fit base"):
                sync.fetch(read_manifest(policy, 2))  # the hub serves its files; it adopts v2 on restart
            assert sync.local(2) is None
    finally:
        hub.stop()


def test_merge_stream_keeps_order_and_equals_the_merged_state(tiny_model_dir):
    """Streaming merge (what a sharded publish consumes): the merged model's tensors in the model's own
    order (a bias after its weight), equal to merging the whole state at once."""
    from rl.weights.lora import merge_stream, merged_names

    model = lora_model(tiny_model_dir)
    model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias = torch.nn.Parameter(torch.ones(64))
    state = model.state_dict()
    streamed = list(merge_stream(state.items(), LORA.alpha / LORA.r))
    assert [n for n, _ in streamed] == merged_names(state)
    names = [n for n, _ in streamed]
    q_proj = "model.layers.0.self_attn.q_proj"
    assert names.index(f"{q_proj}.bias") == names.index(f"{q_proj}.weight") + 1
    whole = merged_state_dict(state, LORA.alpha / LORA.r)
    for name, tensor in streamed:
        assert torch.equal(tensor, whole[name]), name
    with pytest.raises(ValueError, match="without all of weight"):
        list(merge_stream([(n, t) for n, t in state.items() if "lora_B" not in n], 1.0))
