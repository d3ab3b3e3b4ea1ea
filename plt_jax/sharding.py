"""Sharding rules, kept beside the model and out of its math.

The model names every parameter and a few activations by *logical* axes ('embed', 'mlp', 'heads',
'batch', ...). Here those names meet a mesh with axes ('data', 'fsdp', 'tensor'):
  * `LOGICAL_RULES` maps logical names to mesh axes (FSDP over 'fsdp', Megatron-style TP over 'tensor',
    batch over data x fsdp);
  * `make_mesh` sizes the mesh from the config (-1 fills the remaining devices);
  * `ShardingConfig(mesh, rules)` is that pairing as data: the model's activation constraints and
    the kernels' per-shard calls take it explicitly (through `plt_jax.runtime.Runtime`);
  * `param_shardings` places parameters (a dimension that a mesh axis does not divide
    is replicated instead of failing, so tiny test models run on any mesh).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

LogicalRules = tuple[tuple[str, Any], ...]

LOGICAL_RULES: LogicalRules = (
    # parameters
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('norm', None),
    ('gate_heads', None),
    ('head_dim', None),
    # activations
    ('batch', ('data', 'fsdp')),
    ('seq', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; exactly one size may be -1 and takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {'data': data, 'fsdp': fsdp, 'tensor': tensor}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f'mesh: at most one axis may be -1, got {sizes}')
  for k, v in sizes.items():
    if v != -1 and (not isinstance(v, int) or v < 1):
      raise ValueError(f'mesh.{k}={v!r}: must be a positive integer or -1')
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if len(devices) % fixed:
      raise ValueError(f'mesh: {len(devices)} devices are not divisible by the fixed axes {sizes}')
    sizes[free[0]] = len(devices) // fixed
  total = math.prod(sizes.values())
  if total != len(devices):
    raise ValueError(f'mesh: axes {sizes} need {total} devices, but {len(devices)} are available')
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    dev_array = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except
    dev_array = np.asarray(devices).reshape(shape)
  return Mesh(dev_array, MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical: Sequence[Optional[str]], rules: LogicalRules = LOGICAL_RULES,
                    shape: Optional[Sequence[int]] = None, mesh: Optional[Mesh] = None) -> P:
  """Maps logical axis names to a PartitionSpec; drops mesh axes that are reused or don't divide."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(logical):
    axes = table.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    keep = []
    for ax in axes:
      if ax in used:
        continue
      if mesh is not None and shape is not None:
        size = math.prod(mesh.shape[a] for a in keep + [ax])
        if shape[i] % size:
          continue
      keep.append(ax)
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return P(*out)


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
  """A mesh and the logical-axis rules for it: what the model's activation constraints and the
  kernels' per-shard calls read. Passed explicitly (inside `plt_jax.runtime.Runtime`) to every
  traced function that runs the model on a mesh; hashable, so it is part of jit's cache key."""
  mesh: Mesh
  rules: LogicalRules = LOGICAL_RULES

  def spec(self, logical: Sequence[Optional[str]], shape: Sequence[int]) -> P:
    return logical_to_spec(logical, self.rules, shape, self.mesh)


def constrain(x: jax.Array, logical: Sequence[Optional[str]],
              sharding: Optional[ShardingConfig]) -> jax.Array:
  """Annotates an activation with logical axes on `sharding`'s mesh; a no-op without one."""
  if sharding is None:
    return x
  spec = sharding.spec(logical, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))


def _logical_names(var) -> Optional[tuple]:
  meta = var.get_metadata() if hasattr(var, 'get_metadata') else {}
  return meta.get('out_sharding') or meta.get('sharding')


def param_shardings(state: nnx.State, mesh: Mesh, rules: LogicalRules = LOGICAL_RULES):
  """NamedSharding for every variable of an (abstract or concrete) nnx.State."""

  def one(var):
    names = _logical_names(var)
    shape = var.shape if hasattr(var, 'shape') else np.shape(var[...])
    if not names:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_to_spec(names, rules, shape, mesh))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: LogicalRules = LOGICAL_RULES, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(('batch',) + (None,) * (ndim - 1), rules))
