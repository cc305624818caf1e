"""Two machines, one process each, played on 127.0.0.1: the sft stage relaunched by qatune under torchrun's
multi-node rendezvous (PET_NNODES, PET_NODE_RANK, PET_RDZV_ENDPOINT), DDP with gloo on CPU.

Each "node" has its own copy of the project, as separate machines would: both train, and the adapter is
written once, by the node that holds global rank 0.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

from tests.stages.test_training_stages import data_stages, lora_b_norm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_one_process_each_train_one_adapter(project, tmp_path):
    node0 = project()
    data_stages(node0)
    node1 = tmp_path / "node1"
    shutil.copytree(node0, node1)  # the same code, params, data and base on the second machine
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for rank, folder in enumerate((node0, node1)):
        env = {
            **os.environ,
            "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
            "PET_NNODES": "2",
            "PET_NODE_RANK": str(rank),
            "PET_RDZV_ENDPOINT": endpoint,
            "PET_RDZV_ID": "qatune-two-nodes-test",
        }
        env.pop("LOCAL_RANK", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, "stages/sft.py", "--params", "params.yaml"],
                cwd=folder,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=300) for p in procs]
    for rank, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"node {rank} failed:\n{out[-3000:]}\n{err[-3000:]}"
        assert f"launching 2 processes (1 on node {rank} of 2)" in out
        assert "--nnodes=2" in out and f"--node-rank={rank}" in out and f"--rdzv-endpoint={endpoint}" in out

    # c10d's rendezvous picks which node holds global rank 0: that node alone writes the adapter.
    written = [f for f in (node0, node1) if (f / "models/sft/adapter_model.safetensors").is_file()]
    assert len(written) == 1
    metrics = json.loads((written[0] / "metrics/sft.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    # sft.focus_rows with max_steps: each step takes batch 2 x grad_accum 1 rows on each of the 2 ranks.
    assert metrics["train_rows"] == 4 * 2 * 1 * 2
    assert lora_b_norm(written[0] / "models/sft") > 0
    other = node1 if written[0] == node0 else node0
    assert not (other / "metrics/sft.json").exists()
