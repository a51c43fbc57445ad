"""Split one training or inference workload over ranks the way a multi-GPU run does. No measuring here.

The same code runs in three places: the tracer (fake tensors, PyTorch's fake process group — every
collective a no-op, so one process plays one rank of any world size), multi-rank experiments on
GPUs (torchrun, NCCL) and their CPU rehearsal (torchrun, gloo). The spec decides the strategy:

- `--zero 0` over several GPUs: DDP (`DistributedDataParallel`, default 25 MiB buckets; the
  gradients are copied into bucket buffers for the all-reduce, `gradient_as_bucket_view=False`).
- `--zero 1`: DDP, with `ZeroRedundancyOptimizer` keeping each rank's share of the optimizer state
  (whole parameters per rank, greedily balanced by size: `formulas.predict.zero1_partition`).
- `--zero 2` / `--zero 3`: FSDP2 `fully_shard` on every decoder layer and on the root, with
  `reshard_after_forward` False / True (parameters stay gathered from forward to backward, or are
  freed after each layer's forward and gathered again in backward). With `--shard-gpus G` the mesh is
  2-D (replicate, shard): hybrid sharding, FSDP over groups of G and replicas across them.
- `--tp N`: the model's own tensor-parallel plan (`config.base_model_tp_plan`, "colwise" /
  "rowwise" for the linear layers; an untied head "colwise_gather_output") applied with
  `torch.distributed.tensor.parallel`; embeddings, norms and a tied head stay whole on every rank.
  Over `--gpus` > `--tp` the data-parallel dimension is DDP, or with `--zero 2|3` FSDP2 on the mesh's
  `dp` dimension over the TP-sharded (DTensor) parameters — torchtitan's 2-D parallelism (TP first, then
  `fully_shard` per decoder layer and the root on the data-parallel mesh).

Pipeline parallelism, layer splits and offload are not built here.
"""

from formulas.spec import SpecError

from .models import decoder_layers, strategy_of, torch_dtype

def _ddp(module, group=None):
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, process_group=group)


def tp_plan(model):
    """{module path: style} from the model's plans: its config's base_model_tp_plan for the layers
    ('colwise' / 'rowwise'), and the class's own for an untied head ('colwise_gather_output': sharded
    by vocabulary, the logits gathered on every rank). A tied head is the embedding: both stay whole."""
    import fnmatch

    base = getattr(model.config, "base_model_tp_plan", None) or {}
    if not base:
        raise SpecError(f"--tp: {model.config.model_type} has no tensor-parallel plan in transformers")
    prefix = model.base_model_prefix + "."
    names = [n for n, _ in model.named_modules()]
    plan = {}
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    for name, style in (getattr(type(model), "_tp_plan", None) or {}).items():
        if style == "colwise_gather_output" and not tied and name in names:
            plan[name] = style
    for pattern, style in base.items():
        if style not in ("colwise", "rowwise"):
            raise SpecError(f"--tp: {model.config.model_type}'s plan uses '{style}' for {pattern}; "
                            "only colwise/rowwise linear layers are built")
        for n in names:
            if fnmatch.fnmatchcase(n, prefix + pattern.replace("*", "[0-9]*")):
                plan[n] = style
    return plan


def _mesh(device_type, dims, names=None):
    """A device mesh, made outside any fake-tensor mode (it reads its rank map as real data)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh

    with unset_fake_temporarily():
        return init_device_mesh(device_type, dims, mesh_dim_names=names)


def shard(model, spec, device_type="cpu"):
    """FSDP2 or tensor parallelism, in place, in the default process group (world = spec.gpus).

    Under --precision master FSDP2 keeps fp32 shards (the model is built in fp32) and gathers them in
    the compute dtype (`MixedPrecisionPolicy`, gradients reduce-scattered in fp32)."""
    import torch.distributed as dist

    strategy = strategy_of(spec)
    if strategy is None:
        return model
    world = dist.get_world_size()
    if world != spec.gpus:
        raise SpecError(f"--gpus {spec.gpus}: the process group has {world} ranks")
    if strategy == "fsdp":
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # --shard-gpus: hybrid sharding, FSDP2 over a 2-D (replicate, shard) mesh
        mesh = _mesh(device_type, (world // spec.shard_gpus, spec.shard_gpus), ("replicate", "shard")) \
            if spec.shard_gpus and spec.shard_gpus < world else _mesh(device_type, (world,))
        kw = {"mesh": mesh, "reshard_after_forward": spec.zero == 3}
        if spec.precision == "master":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch_dtype(spec.compute_dtype), reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
    elif strategy in ("tp", "tp_fsdp"):
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = _mesh(device_type, (world // spec.tp, spec.tp), ("dp", "tp"))
        from torch.distributed.tensor import Replicate

        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel,
                  "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate())}
        parallelize_module(model, mesh["tp"], {name: styles[style]() for name, style in tp_plan(model).items()})
        model._vramlab_dp_group = None
        if strategy == "tp_fsdp":
            from torch.distributed.fsdp import fully_shard

            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():  # a sub-mesh reads the rank map as real data
                dp_mesh = mesh["dp"]
            kw = {"mesh": dp_mesh, "reshard_after_forward": spec.zero == 3}
            if spec.precision == "master":
                import torch
                from torch.distributed.fsdp import MixedPrecisionPolicy

                kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch_dtype(spec.compute_dtype),
                                                       reduce_dtype=torch.float32)
            for layer in decoder_layers(model):
                fully_shard(layer, **kw)
            fully_shard(model, **kw)
            return model
        if spec.mode == "train":
            from torch.distributed.tensor.parallel.ddp import _pre_dp_module_transform

            # Local shards as the parameters: DDP buckets them, and the optimizer's foreach kernels refuse a
            # mix of DTensor (sharded) and plain (replicated) tensors.
            _pre_dp_module_transform(model)
            if world > spec.tp:
                model._vramlab_dp_group = mesh["dp"].get_group()
    return model


def replicate(model, spec):
    """DDP over the data-parallel ranks where the strategy has them (training only); the model otherwise.

    Under tensor parallelism DDP runs over the `dp` mesh dimension, on the local shards (`shard` made
    them the parameters: `_pre_dp_module_transform`)."""
    strategy = strategy_of(spec)
    if spec.mode != "train" or strategy not in ("ddp", "zero1", "tp"):
        return model
    group = None
    if strategy == "tp":
        group = getattr(model, "_vramlab_dp_group", None)
        if group is None:
            return model
    return _ddp(model, group)


def parallelize(model, spec, device_type="cpu"):
    """`shard`, then `replicate`: the model to run on this rank."""
    return replicate(shard(model, spec, device_type), spec)


def make_parallel_optimizer(model, spec):
    """The spec's optimizer over the trainable parameters; under --zero 1 each rank keeps its share."""
    from .steps import make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    if strategy_of(spec) != "zero1":
        return make_optimizer(params, spec)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    one = make_optimizer(params[:1], spec)  # the spec's optimizer class and its implementation flags
    defaults = {k: v for k, v in one.defaults.items() if k in ("lr", "foreach", "fused", "momentum")}
    return ZeroRedundancyOptimizer(params, optimizer_class=type(one), **defaults)


def unwrap(model):
    """The module inside a DDP wrapper (the model itself otherwise)."""
    return getattr(model, "module", model)
