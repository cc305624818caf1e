"""The memory plan against hand arithmetic: parameter counts from config numbers, the seed profiles on 16, 24,
40 and 80 GB cards (where score and merge run, in which dtype, and which combinations stop), and the
embedded default on a CPU, whose placement must not change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qatune import hardware, plan
from qatune.errors import QatuneError
from qatune.profiles import merged
from tests.seeds import SEEDS

ROOT = Path(__file__).resolve().parents[2]
GB = 1e9

# Mistral-7B by hand: 32 layers of q, o 4096x4096, k, v 4096x1024 (8 kv heads x 128), gate, up, down
# 4096x14336, two 4096 norms; untied 32000x4096 embeddings and head; a final norm.
MISTRAL_LAYER = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
MISTRAL = 32 * MISTRAL_LAYER + 2 * 32000 * 4096 + 4096  # 7,241,732,096


def test_parameter_counts_match_the_hand_count_and_the_published_sizes():
    assert MISTRAL == 7_241_732_096
    assert plan.parameters(plan.KNOWN["mistralai/Mistral-7B-Instruct-v0.1"]) == MISTRAL
    # the exact count fetch recorded for the bundled SmolLM2 (models/base/qatune_base.json)
    assert plan.parameters(plan.KNOWN["bundled:smollm2-135m-instruct"]) == 134_515_008
    published = {  # the model cards' sizes
        "unsloth/Qwen3-0.6B": 0.596e9,
        "Qwen/Qwen2.5-0.5B-Instruct": 0.494e9,
        "google/gemma-2b-it": 2.506e9,
        "unsloth/Llama-3.2-3B-Instruct": 3.213e9,
    }
    for hub_id, size in published.items():
        assert plan.parameters(plan.KNOWN[hub_id]) == pytest.approx(size, rel=0.002), hub_id


def test_every_seed_base_is_in_the_table():
    assert [s.base_model for s in SEEDS if s.base_model not in plan.KNOWN] == []


def test_config_json_gives_the_same_architecture_as_the_table(tmp_path):
    """SmolLM2's config.json numbers, read from a folder, equal the table's; a folder fetched from another
    source is passed over for the table."""
    config = {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "qatune_base.json").write_text(json.dumps({"source": "bundled:smollm2-135m-instruct"}))
    assert plan.load_arch(tmp_path) == plan.KNOWN["bundled:smollm2-135m-instruct"]
    assert plan.load_arch(tmp_path, "google/gemma-2b-it") == plan.KNOWN["google/gemma-2b-it"]
    with pytest.raises(QatuneError, match="no config.json for 'someone/unknown-model'"):
        plan.load_arch(tmp_path, "someone/unknown-model")


def test_lora_parameters_by_hand():
    """Mistral q_proj + v_proj at r 16: 16 x (4096 + 4096) + 16 x (4096 + 1024) per layer, 32 layers."""
    mistral = plan.KNOWN["mistralai/Mistral-7B-Instruct-v0.1"]
    assert plan.lora_parameters(mistral, 16, ["q_proj", "v_proj"]) == 32 * 16 * (8192 + 5120)
    everything = plan.lora_parameters(mistral, 16, "all-linear")
    assert everything == 32 * 16 * (8192 + 5120 * 2 + 8192 + 3 * (4096 + 14336))


def plans(profile: str, gpu_gb: float, ram_gb: float | None = None, **overrides) -> dict[str, plan.StagePlan]:
    """Each stage's plan for a seed profile on a card, by stage name; overrides replace params blocks."""
    params = merged(profile, ROOT / "params.yaml", ROOT / "profiles")[1]
    blocks = {k: getattr(params, k) for k in ("train", "sft", "dpo", "clean", "evaluate", "merge", "export")}
    for key, value in overrides.items():
        block, field = key.split("__")
        blocks[block] = blocks[block].model_copy(update={field: value})
    arch, hw = plan.KNOWN[params.base_model.source], plan.card(gpu_gb, ram_gb=ram_gb)
    return {p.stage: p for p in plan.whole_run(arch, hw, *blocks.values())}


# Where score and merge run on each card (device dtype batch), worked out by hand from the numbers below.
# score, bf16 on a bf16 card: weights 2 bytes/param, activations batch x clean.max_length x (2 hidden +
# 3 intermediate + hidden) x 2 bytes, + 0.5 GB CUDA context; it fits at 90% of the card, halving the batch.
# merge in merge.dtype (float32 in every seed, the embedded default's): weights 4 bytes/param + the check's
# logits (4 prompts x 256 tokens x vocab x 12 bytes). Where it does not fit, the CPU in float32.
SEED_TABLE = {
    #                   16 GB               24 GB                40 GB                80 GB
    "seed000-qwen3-dpo": {
        # 0.6B: score 1.2 GB weights + 1.5 GB kv cache; merge 2.4 GB + 1.9 GB logits (152k words)
        "score": ["cuda bfloat16 32"] * 4,
        "merge": ["cuda float32"] * 4,
    },
    "seed001-qwen25-sft": {
        "score": ["cuda bfloat16 32"] * 4,
        "merge": ["cuda float32"] * 4,
    },
    "seed002-gemma-psychology": {
        # 2.51B: score 5.0 + 3.6 activations (32 x 1024 x 55296 x 2) + 0.5 = 9.2 GB; merge 10.0 + 3.1 logits
        # (256k words) + 0.2 + 0.1 adapter + 0.5 = 14.0 GB, just under 90% of 16 GB
        "score": ["cuda bfloat16 32"] * 4,
        "merge": ["cuda float32"] * 4,
    },
    "seed003-mistral-qlora": {
        # 7.24B: bf16 weights 14.5 GB + 0.5 context is over 90% of 16 GB: the CPU. On 24 GB batch 32 x 2048
        # tokens needs 7.2 GB of activations (22.3 GB in all, limit 21.6): batch 16 (18.6 GB).
        # merge in float32: 29.0 GB + 0.6 = 30.1 GB: only 40 and 80 GB cards
        "score": ["cpu float32 32", "cuda bfloat16 16", "cuda bfloat16 32", "cuda bfloat16 32"],
        "merge": ["cpu float32", "cpu float32", "cuda float32", "cuda float32"],
    },
    "seed004-llama32-finetome": {
        # 3.21B: score 6.4 + 4.4 + 0.1 + 0.5 = 11.5 GB; merge 12.9 + 1.6 logits (128k words) + 0.7 = 15.2 GB,
        # over 14.4: the CPU on a 16 GB card
        "score": ["cuda bfloat16 32"] * 4,
        "merge": ["cpu float32", "cuda float32", "cuda float32", "cuda float32"],
    },
}
CARDS = (16, 24, 40, 80)


@pytest.mark.parametrize("profile", sorted(SEED_TABLE))
@pytest.mark.parametrize("gpu_gb", CARDS)
def test_seed_profiles_on_each_card(profile, gpu_gb):
    got = plans(profile, gpu_gb)
    for stage in ("score", "merge"):
        expected = SEED_TABLE[profile][stage][CARDS.index(gpu_gb)]
        p = got[stage]
        assert " ".join([p.device, p.dtype] + ([str(p.batch)] if p.batch else [])) == expected, stage
    # every seed trains on a 16 GB card: none stops, and nothing it plans is over 90% of the card
    for p in got.values():
        assert p.device, p.line()
        if p.device == "cuda":
            assert p.need_gb <= 0.9 * gpu_gb


def test_mistral_numbers_by_hand():
    """seed003 on an 80 GB card: bf16 weights 2 x 7.24e9 = 14.5 GB; float32 29.0 GB (today's score and
    merge loaded that, and merge a second copy: ~58 GB); merge in bf16 is 14.5 GB + the adapter."""
    got = plans("seed003-mistral-qlora", 80)
    assert got["score"].parts["weights"] == pytest.approx(2 * MISTRAL / GB, abs=0.01)  # 14.48
    assert got["merge"].parts["weights"] == pytest.approx(4 * MISTRAL / GB, abs=0.01)  # 28.97
    adapter = 32 * 16 * (8192 + 5120) * 4 / GB  # q_proj + v_proj at r 16, float32
    assert got["merge"].parts["adapter"] == pytest.approx(adapter, abs=0.001)
    bf16 = plans("seed003-mistral-qlora", 24, merge__dtype="bfloat16")["merge"]
    assert (bf16.device, bf16.dtype) == ("cuda", "bfloat16")
    assert bf16.parts["weights"] + bf16.parts["adapter"] == pytest.approx(
        2 * MISTRAL / GB + adapter, abs=0.01
    )
    # 14.5 + 0.5 context + the check is over 90% of a 16 GB card even in bf16: the CPU, in float32
    assert plans("seed003-mistral-qlora", 16, merge__dtype="bfloat16")["merge"].device == "cpu"


def test_qlora_training_by_hand():
    """seed003's SFT: nf4 with double quantisation, 0.5 + 1/64 + 4/(64 x 256) byte per linear weight; the
    32000 x 4096 embeddings and head in float32 (peft's prepare_model_for_kbit_training); 8192 tokens a
    step (4 x 2048), each layer's 4096-wide input kept in fp16 under checkpointing."""
    sft = plans("seed003-mistral-qlora", 16)["sft"]
    linear = 32 * (MISTRAL_LAYER - 2 * 4096)
    assert sft.dtype == "nf4"
    assert sft.parts["weights"] == pytest.approx(
        (linear * (0.5 + 1 / 64 + 4 / 16384) + (MISTRAL - linear) * 4) / GB, abs=0.01
    )  # 3.60 + 1.05
    checkpointed = 32 * 8192 * 4096 * 2 / GB  # 2.15 GB
    assert sft.parts["activations"] > checkpointed
    assert sft.device == "cuda" and sft.need_gb < 0.9 * 16


def test_eight_bit_training_by_hand():
    """seed003's SFT with 8-bit weights instead (train.load_in_8bit): one byte per linear weight, the rest in
    float32 as under 4-bit; between QLoRA and fp16 weights (2 bytes per parameter)."""
    sft = plans("seed003-mistral-qlora", 24, train__load_in_4bit=False, train__load_in_8bit=True)["sft"]
    linear = 32 * (MISTRAL_LAYER - 2 * 4096)
    assert sft.dtype == "int8"
    assert sft.parts["weights"] == pytest.approx((linear * 1 + (MISTRAL - linear) * 4) / GB, abs=0.01)  # 8.03
    four = plans("seed003-mistral-qlora", 24)["sft"].parts["weights"]
    assert four < sft.parts["weights"] < 2 * MISTRAL / GB
    assert sft.device == "cuda"


def test_dpo_doubles_the_batch():
    """chosen and rejected go through one forward pass: seed000's DPO keeps twice the activations of an SFT
    step of the same batch and length."""
    params = merged("seed000-qwen3-dpo", ROOT / "params.yaml", ROOT / "profiles")[1]
    arch, hw = plan.KNOWN["unsloth/Qwen3-0.6B"], hardware.choose(params.train, plan.card(16))
    dpo = plan.training("dpo", arch, params.train, params.dpo, hw)
    sft = plan.training("sft", arch, params.train, params.dpo, hw)
    assert dpo.parts["activations"] == pytest.approx(2 * sft.parts["activations"], rel=0.01)


@pytest.mark.parametrize(
    ("profile", "gpu_gb", "ram_gb", "overrides", "stops"),
    [
        # the 7B in 16-bit weights (14.5 GB) cannot train on a 16 GB card without 4-bit
        ("seed003-mistral-qlora", 16, None, {"train__load_in_4bit": False}, {"sft"}),
        # QLoRA Mistral (~9.9 GB) does not fit an 8 GB card either
        ("seed003-mistral-qlora", 8, None, {}, {"sft"}),
        # score and merge of the 7B on a 16 GB card fall back to the CPU: with 16 GB of RAM there is no room
        ("seed003-mistral-qlora", 16, 16, {}, {"score", "merge", "export"}),
        # the same with 64 GB of RAM: everything has a place
        ("seed003-mistral-qlora", 16, 64, {}, set()),
        ("seed004-llama32-finetome", 80, 64, {}, set()),
    ],
)
def test_what_stops(profile, gpu_gb, ram_gb, overrides, stops):
    got = plans(profile, gpu_gb, ram_gb, **overrides)
    assert {s for s, p in got.items() if not p.device} == stops
    for stage in stops:
        with pytest.raises(QatuneError, match=f"memory plan: {stage} does not fit"):
            got[stage].require()


def test_four_bit_training_without_a_gpu_stops_in_the_plan():
    params = merged("seed003-mistral-qlora", ROOT / "params.yaml", ROOT / "profiles")[1]
    cpu = hardware.Hardware(cuda=False, cuda_bf16=False, cpu_bf16=False, gpu_gb=None, ram_gb=64)
    blocks = [getattr(params, k) for k in ("train", "sft", "dpo", "clean", "evaluate", "merge", "export")]
    sft = plan.whole_run(plan.KNOWN[params.base_model.source], cpu, *blocks)[0]
    assert (sft.stage, sft.device) == ("sft", "")
    assert "4-bit (QLoRA) loading needs a CUDA GPU" in sft.advice
    blocks[0] = params.train.model_copy(update={"load_in_4bit": False, "load_in_8bit": True})
    sft = plan.whole_run(plan.KNOWN[params.base_model.source], cpu, *blocks)[0]
    assert sft.device == "" and "8-bit (bitsandbytes LLM.int8) loading needs a CUDA GPU" in sft.advice


def test_embedded_default_on_a_cpu_keeps_its_placement():
    """SmolLM2 on a 2-core CPU with 24 GB: score and merge load float32 on the CPU as before (the same
    numbers), at the configured batch; nothing stops."""
    params = merged("cpu-default", ROOT / "params.yaml", ROOT / "profiles")[1]
    arch = plan.KNOWN["bundled:smollm2-135m-instruct"]
    for cpu_bf16 in (False, True):
        hw = hardware.Hardware(cuda=False, cuda_bf16=False, cpu_bf16=cpu_bf16, gpu_gb=None, ram_gb=24)
        ev, clean = params.evaluate, params.clean
        score = plan.score(arch, hw, ev.score_precision, ev.batch_size, clean.max_length, 0, (256, 160))
        merge = plan.merge(arch, hw, params.merge.dtype, 0, params.merge.check_prompts)
        assert (score.device, score.dtype, score.batch) == ("cpu", "float32", ev.batch_size)
        assert (merge.device, merge.dtype) == ("cpu", "float32")
        assert (score.device, score.dtype) == hardware.placement("score", hw)
        assert (merge.device, merge.dtype) == hardware.placement("merge", hw)
        # 0.54 GB of float32 weights: the plan stays far below the 2.7-3.1 GB the stages were measured at
        assert score.parts["weights"] == pytest.approx(134_515_008 * 4 / GB, abs=0.001)
        assert score.need_gb < 3


def test_placement_on_a_gpu_is_the_working_dtype_or_the_cpu():
    cuda = hardware.Hardware(cuda=True, cuda_bf16=True, cpu_bf16=False)
    assert hardware.placement("score", cuda, "bfloat16") == ("cuda", "bfloat16")
    assert hardware.placement("merge", cuda, "bfloat16", fits_gpu=False) == ("cpu", "float32")
    assert hardware.placement("merge", cuda) == ("cuda", "float32")  # callers that do not plan


def test_a_t4_scores_in_float32_never_fp16():
    """A card without bf16 scores in float32 (hardware.score_dtype: fp16's range is too narrow): Mistral's
    29 GB does not fit 16 GB, so it scores on the CPU; Qwen2.5-0.5B's 2 GB does."""
    params = merged("seed001-qwen25-sft", ROOT / "params.yaml", ROOT / "profiles")[1]
    t4 = plan.card(16, bf16=False)
    ev = params.evaluate
    small = plan.score(plan.KNOWN["Qwen/Qwen2.5-0.5B-Instruct"], t4, ev.score_precision, 32, 512)
    big = plan.score(plan.KNOWN["mistralai/Mistral-7B-Instruct-v0.1"], t4, ev.score_precision, 32, 2048)
    assert (small.device, small.dtype) == ("cuda", "float32")
    assert (big.device, big.dtype) == ("cpu", "float32")


def test_the_plan_line_and_record():
    p = plans("seed003-mistral-qlora", 24)["score"]
    assert p.line().startswith("memory plan: score on cuda in bfloat16, batch 16, ~18.")
    assert p.line().endswith("of 24 GB (weights 14.5, activations 3.6, runtime 0.5)")
    record = p.record()
    assert record["device"] == "cuda" and record["line"] == p.line()
    json.dumps(record)  # it goes into the stage's metrics json


def test_table_marks_stops():
    stopped = plan.StagePlan("sft", "", "nf4", 9.9, 8.0, {"weights": 4.6}, "lower sft.batch_size")
    text = plan.table([("seed003", "8 GB GPU", [stopped])])
    assert "| seed003 | 8 GB GPU | STOP 9.9 | - | - | - | - |" in text
