"""How a training stage is relaunched over several processes and machines: DDP under torchrun, FSDP under
accelerate launch (parsed here by the installed accelerate's own launcher), multi-node settings from
torchrun's environment variables, and the 4-bit / placement choices the base model loads with under FSDP."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from qatune import training
from qatune.errors import QatuneError
from qatune.hardware import Hardware
from qatune.training import Nodes, nodes_from_env, python_command

ROOT = Path(__file__).resolve().parents[2]
TWO_NODES = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_RDZV_ENDPOINT": "10.0.0.5:29400"}


def test_one_machine_unless_the_environment_names_several():
    assert nodes_from_env({}) == Nodes() == nodes_from_env({"PET_NNODES": "1", "PET_NODE_RANK": "0"})
    assert nodes_from_env({**TWO_NODES, "PET_RDZV_ID": "run-7"}) == Nodes(
        2, 1, "10.0.0.5:29400", "run-7", "c10d"
    )


@pytest.mark.parametrize(
    "env",
    [
        {"PET_NNODES": "2", "PET_NODE_RANK": "1"},  # nowhere to meet
        {**TWO_NODES, "PET_RDZV_ENDPOINT": "10.0.0.5"},  # no port
        {**TWO_NODES, "PET_NODE_RANK": "2"},  # ranks are 0 and 1
        {**TWO_NODES, "PET_NNODES": "1:4"},  # an elastic range
    ],
)
def test_incomplete_multi_node_settings_are_one_line_errors(env):
    with pytest.raises(QatuneError, match="PET_"):
        nodes_from_env(env)


def test_ddp_runs_under_torchrun_standalone_on_one_machine_and_rendezvous_on_several():
    assert python_command("stages/sft.py", 1, ["--x"]) == [sys.executable, "stages/sft.py", "--x"]
    assert python_command("stages/sft.py", 2, ["--x"])[1:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "stages/sft.py", "--x",
    ]  # fmt: skip
    nodes = nodes_from_env(TWO_NODES)
    # One process per machine is still a distributed run: two machines, world size 2.
    assert python_command("stages/sft.py", 1, ["--x"], "ddp", nodes)[1:] == [
        "-m", "torch.distributed.run", "--nproc_per_node=1", "--nnodes=2", "--node-rank=1",
        "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.5:29400", "--rdzv-id=qatune", "stages/sft.py", "--x",
    ]  # fmt: skip


def test_torchrun_reads_the_multi_node_command_as_meant():
    from torch.distributed.run import get_args_parser

    cmd = python_command("stages/sft.py", 4, ["--params", "p.yaml"], "ddp", nodes_from_env(TWO_NODES))
    args = get_args_parser().parse_args(cmd[3:])
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("4", "2", 1)
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == ("c10d", "10.0.0.5:29400", "qatune")
    assert not args.standalone
    assert (args.training_script, args.training_script_args) == ("stages/sft.py", ["--params", "p.yaml"])


def accelerate_view(cmd: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    """What the installed accelerate makes of a command: the arguments `accelerate launch` runs with (parsed
    and validated by its own code), and the environment and torchrun arguments its FSDP launcher gives
    every process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--use_fsdp"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[3:]))
    env = prepare_multi_gpu_env(args)
    return args, env


def test_fsdp_runs_under_accelerate_launch_with_sharded_loading_and_full_state_dict():
    cmd = python_command("stages/sft.py", 4, ["--params", "p.yaml"], "fsdp")
    args, env = accelerate_view(cmd)
    assert args.use_fsdp and (args.num_processes, args.num_machines) == (4, 1)
    assert (args.training_script, args.training_script_args) == ("stages/sft.py", ["--params", "p.yaml"])
    assert args.nproc_per_node == "4" and args.main_process_port > 0  # 0 asked for a free port
    # What transformers reads before loading the base (is_fsdp_enabled) and accelerate's FSDP plugin.
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    assert env["FSDP_SYNC_MODULE_STATES"] == "true"  # rank 0's weights reach the others
    assert (env["FSDP_VERSION"], env["FSDP_STATE_DICT_TYPE"]) == ("2", "FULL_STATE_DICT")
    assert (env["FSDP_AUTO_WRAP_POLICY"], env["FSDP_RESHARD_AFTER_FORWARD"]) == (
        "TRANSFORMER_BASED_WRAP",
        "true",
    )


def test_fsdp_over_two_machines_counts_every_process_and_meets_at_node_zero():
    cmd = python_command("stages/dpo.py", 2, [], "fsdp", nodes_from_env(TWO_NODES))
    args, _ = accelerate_view(cmd)
    assert (args.num_processes, args.num_machines, args.machine_rank) == (4, 2, 1)
    assert (args.main_process_ip, args.main_process_port, args.rdzv_backend) == ("10.0.0.5", 29400, "c10d")
    # accelerate hands torchrun 2 processes on this node, node rank 1, node 0's endpoint.
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("2", "2", 1)
    assert args.rdzv_endpoint == "10.0.0.5:29400"


def test_fsdp_process_opens_its_process_group_before_the_model_loads(monkeypatch):
    opened = []
    monkeypatch.setattr("accelerate.PartialState", lambda: opened.append(True))
    monkeypatch.setenv("LOCAL_RANK", "0")
    train = SimpleNamespace(distributed="fsdp", num_processes=2)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    training.relaunch_distributed(train)  # started by torchrun, not accelerate: nothing to do
    assert opened == []
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    training.relaunch_distributed(train)
    assert opened == [True]
    training.relaunch_distributed(SimpleNamespace(distributed="ddp", num_processes=2))
    assert opened == [True]


@pytest.fixture
def loaded(monkeypatch):
    """load_base on a pretend GPU: the keyword arguments it gives from_pretrained."""
    import peft
    import torch
    import transformers

    seen: dict = {}

    def from_pretrained(folder, **kwargs):
        seen.update(kwargs)
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: SimpleNamespace(pad_token="<pad>")
    )
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", lambda model, **k: model)
    monkeypatch.setenv("LOCAL_RANK", "1")

    def load(four_bit: bool, fsdp: bool, eight_bit: bool = False) -> dict:
        from qatune.modeling import load_base
        from qatune.params import load_params

        if fsdp:
            monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        else:
            monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
        train = load_params(ROOT / "params.yaml").train.model_copy(
            update={"load_in_4bit": four_bit, "load_in_8bit": eight_bit}
        )
        hw = Hardware(backend="transformers", cuda=True, cuda_bf16=True, cpu_bf16=False, precision="bf16")
        seen.clear()
        load_base("unused", train, hw, 128)
        return dict(seen)

    return load


def test_4bit_under_fsdp_stores_its_packed_weights_in_the_compute_dtype(loaded):
    import torch

    sharded = loaded(four_bit=True, fsdp=True)["quantization_config"]
    assert sharded.bnb_4bit_quant_storage == torch.bfloat16 == sharded.bnb_4bit_compute_dtype
    assert loaded(four_bit=True, fsdp=False)["quantization_config"].bnb_4bit_quant_storage == torch.uint8


def test_under_fsdp_a_16_bit_base_loads_on_the_cpu_and_a_4_bit_one_on_its_gpu(loaded):
    import torch

    assert "device_map" not in loaded(four_bit=False, fsdp=True)
    assert loaded(four_bit=True, fsdp=True)["device_map"] == {"": 1}
    plain = loaded(four_bit=False, fsdp=False)
    assert plain["device_map"] == {"": 1} and plain["dtype"] == torch.bfloat16


def test_an_8_bit_base_loads_quantised_on_its_gpu(loaded):
    import torch

    asked = loaded(four_bit=False, fsdp=False, eight_bit=True)
    config = asked["quantization_config"]
    assert config.load_in_8bit and not config.load_in_4bit
    assert asked["device_map"] == {"": 1} and asked["dtype"] == torch.bfloat16
