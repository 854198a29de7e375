"""core/storage.py on its own: which strategy holds each state tensor, and what each keeps where."""
from __future__ import annotations

import torch

from sharded_fused_adam.core.compact_state import CHUNK_NUMEL
from sharded_fused_adam.core.storage import Offloaded, ParamMaster, SplitStored, StateStorage, Stored
from sharded_fused_adam.kernels import select_kernel
from sharded_fused_adam.kernels.rule import ADAM


def _storage(dtype: torch.dtype, **options) -> StateStorage:
    shard = torch.randn(40).to(dtype)
    return StateStorage(shard, master_weights=options.pop("master_weights", "fp32"),
                        state_dtype=options.pop("state_dtype", None), offload=options.pop("offload", None),
                        chunk_numel=CHUNK_NUMEL)


def test_the_strategy_of_each_tensor_follows_the_options():
    plain = _storage(torch.float32)
    assert type(plain.master) is ParamMaster and plain.master.nbytes == 0  # the param shard is the master
    assert all(type(m) is Stored and m.in_place for m in plain.moments.values()) and not plain.is_staged
    low = _storage(torch.bfloat16, state_dtype=torch.bfloat16)
    assert low.master.tensor.dtype == torch.float32 and low.master.in_place
    assert all(not m.in_place for m in low.moments.values()) and low.is_staged  # bf16 moments are staged
    split = _storage(torch.bfloat16, master_weights="split")
    assert type(split.master) is SplitStored and split.master.nbytes == 2 * 40
    host = _storage(torch.float32, offload="host")
    assert all(type(m) is Offloaded and not m.in_place for m in host.moments.values())
    assert host.nbytes[2] == sum(m.nbytes for m in host.moments.values())  # all of it in host memory


def test_the_kernel_order_is_the_rule_order():
    storage = _storage(torch.float32)
    assert list(storage.moments) == list(ADAM.moment_keys)
    storage.add_amsgrad()
    assert list(storage.moments) == list(ADAM.keys_for({"amsgrad": True}))
    assert storage.held(True) == [storage.master, *(storage.moments[k] for k in ADAM.keys_for({"amsgrad": True}))]
    assert storage.held(False) == [storage.master, *(storage.moments[k] for k in ADAM.moment_keys)]


def test_a_split_master_loads_and_rebuilds_fp32_bit_for_bit():
    storage = _storage(torch.bfloat16, master_weights="split")
    fp32 = torch.randn(40)
    storage.master.load(fp32)
    assert torch.equal(storage.master.full(), fp32)


def test_the_kernel_not_the_storage_declares_what_it_updates_in_place():
    shard = torch.randn(40).to(torch.bfloat16)
    options = dict(master_weights="fp32", state_dtype=torch.bfloat16, offload=None, chunk_numel=CHUNK_NUMEL)
    assert not select_kernel(None, torch.device("cpu")).reads_in_place(torch.float32, torch.bfloat16)
    staged = StateStorage(shard, **options)
    assert staged.is_staged and not any(m.in_place for m in staged.moments.values())
    native = StateStorage(shard, **options, reads_in_place=lambda compute, stored: stored in (compute, torch.bfloat16))
    assert all(m.in_place for m in native.moments.values()) and not native.is_staged
