"""The mutants ``tools/mutants.py`` plants, and the test selections expected to kill them.

Each mutant is a bug a person could plausibly write (an off-by-one, a forgotten division, a
swapped argument, a check left out), not a syntax error. Add one whenever a bug escapes the
suite: name it after what it breaks, point it at the smallest selection that should see it,
and run ``tools/mutants.py --only <name>``. A mutant that no test can kill because it does not
change behaviour is kept with an ``equivalent`` reason (it documents the decision).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Mutant", "MUTANTS", "SELECTIONS"]


@dataclass(frozen=True)
class Mutant:
    """Replace ``snippet`` (exactly once in ``path``) with ``replacement``; run ``selections``."""

    name: str
    path: str
    snippet: str
    replacement: str
    selections: tuple[str, ...]
    description: str
    equivalent: str = ""


# Test selections: "file" or "file -k expression" (one pytest run joins a mutant's selections).
SELECTIONS: dict[str, tuple[str, ...]] = {
    "reducer": ("tests/test_reducer.py",),
    "reducer_optimizer": ("tests/test_reducer.py -k optimizer_gradient",),
    "bucket_gaps": ("tests/test_semantics.py -k sharing_a_bucket or manual_grads",),
    "semantics": ("tests/test_semantics.py",),
    "parity_custom": ("tests/test_parity.py -k custom_hypers",),
    "parity": ("tests/test_parity.py -k (bitwise_equal and (adam_l2 or mid_buckets or custom)) or ddp",),
    "clip": ("tests/test_precision.py -k clip", "tests/test_numerics.py -k clipping or epsilon"),
    "loss_scaling": ("tests/test_precision.py -k scaler", "tests/test_numerics.py -k fp16 or grad_scaler"),
    "overflow": ("tests/test_numerics.py -k non_finite", "tests/test_idioms.py -k skipped_step"),
    "accumulation": ("tests/test_numerics.py -k micro_batches",),
    "bf16": ("tests/test_numerics.py -k bf16",),
    "idioms": ("tests/test_idioms.py -k zeroing_and_accumulation or follow_torch_zeroing",),
    "idioms_read": ("tests/test_idioms.py -k torch_clip_in_sharded",),
    "idioms_drop_some": ("tests/test_idioms.py -k drop_some",),
    "ddp": ("tests/test_idioms.py -k ddp", "tests/test_parity.py -k ddp"),
    "startup": ("tests/test_idioms.py -k broadcast or different_models or frozen",),
    "checkpoint": ("tests/test_checkpoint.py", "tests/test_checkpoint_integrity.py"),
    "checkpoint_sharded": ("tests/test_checkpoint.py -k resume or bad_sharded",
                           "tests/test_checkpoint_integrity.py -k every_corruption"),
    "checkpoint_torch_dicts": ("tests/test_checkpoint.py -k own_param_ids or into_a_bf16_model",),
    "kernels": ("tests/test_kernels.py",),
    "layout": ("tests/test_layout.py", "tests/test_layout_properties.py"),
    "comm": ("tests/test_comm.py",),
    "memory": ("tests/test_memory_and_overlap.py",),
}

_PKG = "sharded_fused_adam/"


def _m(name: str, module: str, snippet: str, replacement: str, selections: str, description: str,
       equivalent: str = "") -> Mutant:
    return Mutant(name, _PKG + module, snippet, replacement, tuple(selections.split()), description, equivalent)


MUTANTS: list[Mutant] = [
    # ---- the bugs of issue 22's first round (three of them escaped the suite then) ----------
    _m("reducer_no_divide", "grads/reducer.py",
       "divisor = 1 if record.predivide else self._averaging.divisor", "divisor = 1",
       "reducer_optimizer parity", "gradients summed over ranks, never divided by the world size"),
    _m("clip_norm_type_ignored", "optimizer.py",
       "clip_coefficient(self._grad_stats(norm_type).norm / loss_scale, max_norm)",
       "clip_coefficient(self._grad_stats(2.0).norm / loss_scale, max_norm)",
       "clip", "the clip factor always comes from the 2-norm"),
    _m("max_grad_norm_ignored", "optimizer.py",
       "        if self._max_grad_norm is not None:\n            coef = min(",
       "        if False:\n            coef = min(",
       "clip", "ShardedFusedAdam(max_grad_norm=...) never clips"),
    _m("moments_swapped_on_load", "core/bucket.py",
       "target, value = getattr(self, key), shards.get(key)",
       "target, value = getattr(self, key), "
       "shards.get({'exp_avg': 'exp_avg_sq', 'exp_avg_sq': 'exp_avg'}.get(key, key))",
       "checkpoint_torch_dicts checkpoint_sharded",
       "exp_avg and exp_avg_sq swapped when a checkpoint (full or sharded) is loaded"),
    _m("clip_no_epsilon", "numerics/precision.py",
       "return min(1.0, max_norm / (norm + 1e-6))", "return min(1.0, max_norm / max(norm, 1e-30))",
       "clip", "torch's +1e-6 dropped from the clip coefficient"),
    _m("gap_gets_bucket_max_step", "core/bucket.py",
       "kernel_segments(frags, self.layout.slots, [steps[f.slot] for f in frags])",
       "kernel_segments(frags, self.layout.slots, [max(steps) for f in frags])",
       "bucket_gaps", "a param that missed a gradient gets its bucket's highest step count (bias correction)"),
    _m("group_betas_ignored", "optimizer.py",
       'beta1=float(g["betas"][0]),\n                      beta2=float(g["betas"][1]),',
       "beta1=0.9,\n                      beta2=0.999,",
       "parity_custom", "every group runs with torch's default betas"),
    _m("group_eps_ignored", "optimizer.py",
       'eps=float(g["eps"]),', "eps=1e-8,",
       "parity_custom", "every group runs with torch's default eps"),
    _m("hand_set_grad_adds", "grads/grad_watch.py",
       "    def on_write(self, p: torch.Tensor) -> None:\n        if self.phase != GradWatch.BACKWARD:",
       "    def on_write(self, p: torch.Tensor) -> None:\n        if False:",
       "idioms", "p.grad = g after a step adds to the old gradient shard instead of replacing it"),
    # ---- layout -------------------------------------------------------------------------------
    _m("layout_no_alignment", "core/layout.py",
       "cursor = _round_up(cursor + numel, ALIGN_NUMEL)", "cursor = cursor + numel",
       "layout", "params no longer start on 16-element boundaries"),
    _m("layout_cap_ignores_new_param", "core/layout.py",
       "if current and current_numel + aligned > bucket_numel:", "if current and current_numel > bucket_numel:",
       "layout", "a bucket may exceed its cap by the param that overflows it"),
    _m("layout_fragment_short", "core/layout.py",
       "start, end = max(s.offset, lo), min(s.end, hi)", "start, end = max(s.offset, lo), min(s.end, hi - 1)",
       "layout", "the last element of every shard belongs to no fragment"),
    _m("layout_ragged_tail_not_split", "core/layout.py",
       "if frag.param_end == slot.numel and slot.numel % ALIGN_NUMEL:", "if False:",
       "layout parity", "a ragged param's tail is updated mid-segment (vector lanes differ from torch's)"),
    # ---- reducer ------------------------------------------------------------------------------
    _m("reducer_gaps_not_zeroed", "grads/reducer.py",
       "                cb.tensor.narrow(0, start, end - start).zero_()", "                pass",
       "reducer", "a fresh pooled buffer keeps garbage in the alignment gaps, which is summed into shards"),
    _m("reducer_absent_not_zeroed", "grads/reducer.py",
       "                if not filled:\n                    views[slot].zero_()",
       "                if not filled:\n                    pass",
       "reducer bucket_gaps", "a param without a gradient reuses whatever the pooled buffer held"),
    _m("reducer_no_predivide", "grads/reducer.py",
       "        if record.predivide:\n            dst.div_(self._averaging.divisor)",
       "        if False:\n            dst.div_(self._averaging.divisor)",
       "reducer_optimizer", "fp16 reductions are neither pre-divided nor divided afterwards"),
    _m("reducer_overwrites_accumulated", "grads/reducer.py",
       "bucket.grad_shard.add_(summed.div_(divisor) if divisor > 1 else summed)",
       "bucket.grad_shard.copy_(summed.div_(divisor) if divisor > 1 else summed)",
       "accumulation idioms", "a second backward before the step replaces the first one's gradient"),
    _m("reducer_no_sync_ignored", "grads/reducer.py",
       "        if not self._sync:\n            return\n        record, slot = self._where[id(param)]",
       "        record, slot = self._where[id(param)]",
       "reducer accumulation", "no_sync() communicates anyway"),
    _m("reducer_ddp_not_detected", "grads/reducer.py",
       "            if find_ddp([p for r in self._records for p in r.bucket.params]):",
       "            if False:", "ddp",
       "a DDP-wrapped model is reduced a second time"),
    _m("reducer_forgets_whole_bucket_only", "grads/reducer.py",
       "                if frag.slot in hit and bucket.grad_valid:", "                if False:",
       "idioms_drop_some idioms", "zeroing some params of a bucket (param.grad = None) keeps their old shard values"),
    _m("reducer_order_not_agreed", "grads/reducer.py",
       "        return self._plan.broadcast_(order, what=\"broadcast of the bucket order\").tolist()",
       "        return local", "reducer",
       "each rank launches buckets in its own observed order",
       equivalent="every rank runs the same model on the same thread schedule, so the observed orders "
                  "agree in every test; a rank-dependent backward order would hang or mismatch "
                  "collectives, which needs a model whose autograd order depends on the rank"),
    # ---- replicated ---------------------------------------------------------------------------
    _m("replicated_no_divide", "grads/replicated.py",
       "            if self._plan.world_size > 1:\n                summed.div_(self._plan.world_size)",
       "            if False:\n                summed.div_(self._plan.world_size)",
       "reducer_optimizer", "replicated gradients are summed, not averaged"),
    _m("replicated_absent_gets_zero_grad", "grads/replicated.py",
       "set_raw_grad(p, record.views[slot] if present[slot] > 0 else None)",
       "set_raw_grad(p, record.views[slot])",
       "reducer_optimizer", "a param without a gradient on any rank gets a zero param.grad (and steps)"),
    # ---- grad_watch ---------------------------------------------------------------------------
    _m("watch_read_not_seen", "grads/grad_watch.py",
       "        if self.phase == GradWatch.IDLE:\n            self.touched.add(id(p))",
       "        if False:\n            self.touched.add(id(p))",
       "idioms", "model.zero_grad() (which reads every grad) no longer clears the shards"),
    _m("watch_read_none_not_reported", "grads/grad_watch.py",
       "            self.read_none_while_held = True", "            pass",
       "idioms_read", "torch's clip_grad_norm_ on sharded grads clips nothing, silently"),
    # ---- kernels ------------------------------------------------------------------------------
    _m("fused_adamw_uses_adam", "kernels/torch_fused.py",
       "op = torch._fused_adamw_ if decoupled else torch._fused_adam_", "op = torch._fused_adam_",
       "kernels parity_custom", "AdamW runs L2 Adam"),
    _m("reference_bias_correction_no_sqrt", "kernels/reference.py",
       "bias_correction2_sqrt = math.sqrt(1 - beta2**step)", "bias_correction2_sqrt = 1 - beta2**step",
       "kernels", "the reference kernel forgets the square root of the second bias correction"),
    _m("reference_lerp_weight", "kernels/reference.py",
       "exp_avg.lerp_(grad, 1 - beta1)", "exp_avg.lerp_(grad, beta1)",
       "kernels", "the first moment mixes with weight beta1 instead of 1 - beta1"),
    _m("npu_beta_power_not_behind", "kernels/npu.py",
       "beta1_power=beta1 ** (step - 1),", "beta1_power=beta1 ** step,",
       "kernels", "ApplyAdamW gets beta1**t, which it multiplies by beta1 once more"),
    _m("step_not_incremented", "core/bucket.py",
       "return [(start, end, steps[0] + 1) for start, end in self.full_segments]",
       "return [(start, end, steps[0]) for start, end in self.full_segments]",
       "parity", "the kernel gets the step count before this step (bias correction off by one)"),
    # ---- optimizer ----------------------------------------------------------------------------
    _m("steps_advance_without_grad", "optimizer.py",
       "            bucket.advance_steps(mask)", "            bucket.advance_steps([True] * len(mask))",
       "semantics", "a param without a gradient still counts a step"),
    _m("gather_only_full_buckets", "optimizer.py",
       "            if any(mask):  # pipelined", "            if all(mask):  # pipelined",
       "bucket_gaps", "a bucket with one param missing a gradient is updated but never gathered"),
    _m("low_precision_master_not_published", "core/bucket.py",
       "            self.buffer.shard(self.rank).copy_(self._master)", "            pass",
       "bf16", "fp16/bf16 params never receive their updated fp32 masters"),
    # ---- precision ----------------------------------------------------------------------------
    _m("loss_scale_not_removed", "optimizer.py",
       "multiplier = self._clip_coefficient(loss_scale) / loss_scale",
       "multiplier = self._clip_coefficient(loss_scale)",
       "loss_scaling", "gradients reach Adam still multiplied by the loss scale"),
    _m("scaler_hysteresis_off_by_one", "numerics/precision.py",
       "            if self.hysteresis_left > 1:", "            if self.hysteresis_left > 0:",
       "loss_scaling", "one overflow too many is forgiven before backing off"),
    _m("scaler_hysteresis_not_restored", "numerics/precision.py",
       "            self.good_steps = 0\n            self.hysteresis_left = self.hysteresis",
       "            self.good_steps = 0",
       "loss_scaling", "growth does not restore the hysteresis"),
    _m("overflow_flag_needs_two_ranks", "numerics/precision.py",
       "return GradStats(values[0] > 0,", "return GradStats(values[0] > 1,",
       "overflow", "an overflow on a single rank does not skip the step"),
    _m("global_norm_not_unscaled", "optimizer.py",
       "self._global_grad_norm = stats.norm / loss_scale", "self._global_grad_norm = stats.norm",
       "loss_scaling clip", "get_global_grad_norm() reports the loss-scaled norm"),
    # ---- comm ---------------------------------------------------------------------------------
    _m("comm_broadcast_from_rank0", "comm/plans.py",
       "return [dist.broadcast(flat.narrow(0, r * shard_numel, shard_numel), src=self._src(r),",
       "return [dist.broadcast(flat.narrow(0, r * shard_numel, shard_numel), src=self._src(0),",
       "comm", "every shard of the gather comes from rank 0"),
    _m("comm_own_shard_is_first", "comm/plans.py",
       "return flat.narrow(0, self.rank * shard_numel, shard_numel)", "return flat.narrow(0, 0, shard_numel)",
       "comm reducer", "every rank keeps shard 0 of a reduction"),
    _m("comm_inf_norm_summed", "comm/plans.py",
       'op = dist.ReduceOp.MAX if norm_type == float("inf") else dist.ReduceOp.SUM', "op = dist.ReduceOp.SUM",
       "clip", "the inf-norm of the gradients is summed over ranks"),
    _m("comm_plan_swapped", "comm/plans.py",
       'name = "send_recv" if _backend_for(group, device) == "gloo" else "scatter_gather"',
       'name = "scatter_gather" if _backend_for(group, device) == "gloo" else "send_recv"',
       "comm parity", "gloo gets reduce_scatter_tensor/all_gather_into_tensor, NCCL/HCCL send/recv"),
    _m("sendrecv_drops_last_rank", "comm/plans.py",
       "torch.add(acc, contributions[-1], out=own)", "own.copy_(acc)",
       "comm reducer_optimizer", "the send/recv reduction forgets the last rank's contribution"),
    _m("sendrecv_gather_own_shard_everywhere", "comm/plans.py",
       "works = [dist.irecv(flat.narrow(0, r * shard_numel, shard_numel), src=self._src(r), group=group,",
       "works = [dist.irecv(torch.empty_like(flat.narrow(0, r * shard_numel, shard_numel)), "
       "src=self._src(r), group=group,",
       "comm parity", "the send/recv gather receives the peers' shards into scratch, not into the params"),
    _m("reduce_pool_unbounded", "grads/reducer.py",
       "        while len(self._inflight) >= self._max_inflight:\n            self._complete_oldest()\n",
       "", "memory", "the comm buffer pool grows to one buffer per bucket"),
    _m("memory_ignores_receive_buffers", "grads/reducer.py",
       "return pooled + self._plan.receive_buffer_bytes()", "return pooled",
       "memory", "memory_report() leaves out send/recv's pooled receive buffers"),
    # ---- startup ------------------------------------------------------------------------------
    _m("startup_no_param_broadcast", "comm/startup.py",
       '        plan.broadcast_(data, what=f"broadcast of param {i} from rank 0")', "        pass",
       "startup", "ranks seeded differently train different models"),
    _m("startup_digest_ignores_requires_grad", "comm/startup.py",
       "str(p.dtype).removeprefix(\"torch.\"), bool(p.requires_grad))",
       "str(p.dtype).removeprefix(\"torch.\"), True)",
       "startup", "ranks that froze different params are not told at construction"),
    _m("startup_digest_ignores_shape", "comm/startup.py",
       "return [(gi, tuple(p.shape), str(p.dtype)", "return [(gi, (p.numel(),), str(p.dtype)",
       "startup", "params of equal numel but different shapes pass the agreement"),
    # ---- checkpoint ---------------------------------------------------------------------------
    _m("state_dict_lists_unstepped", "checkpoint/gathered.py",
       "if bucket.steps[slot] > 0]", "if bucket.steps[slot] >= 0]",
       "checkpoint", "params that never stepped get state entries (torch has none)"),
    _m("state_dict_ids_not_remapped", "checkpoint/gathered.py",
       "    state = {remap.get(k, k): v for k, v in state_dict[\"state\"].items()}",
       "    state = dict(state_dict[\"state\"])",
       "checkpoint_torch_dicts", "a torch state dict whose param ids are not 0..n-1 loads into the wrong params"),
    _m("load_master_zeroed", "core/bucket.py",
       "            if value is None:\n                self.refresh_master()",
       "            if value is None:\n                self._master.zero_()",
       "checkpoint_torch_dicts", "loading a torch dict into a bf16 model zeroes the fp32 masters"),
    # ---- sharded_checkpoint -------------------------------------------------------------------
    _m("sharded_piece_offset_in_elements", "checkpoint/sharded.py",
       "offset + frag.shard_offset * data.element_size()]", "offset + frag.shard_offset]",
       "checkpoint_sharded", "piece offsets written in elements, read as bytes"),
    _m("sharded_read_offset_from_request", "checkpoint/reader.py",
       "raw = self._bytes(file, offset + (lo - p_start) * item, (hi - lo) * item)",
       "raw = self._bytes(file, offset + (lo - start) * item, (hi - lo) * item)",
       "checkpoint_sharded", "reads at the wrong offset when a saved piece and a requested range overlap partly"),
    _m("sharded_truncation_unchecked", "checkpoint/reader.py",
       "        if size != entry[\"nbytes\"]:", "        if size > entry[\"nbytes\"]:",
       "checkpoint_sharded", "a truncated rank file is not refused"),
    _m("sharded_keep_one_too_many", "checkpoint/sharded.py",
       "for old in versions[:-keep_last]:", "for old in versions[:-keep_last - 1]:",
       "checkpoint", "keep_last keeps one version more than asked"),
]
