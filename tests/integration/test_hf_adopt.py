"""experiments.adopt_release: a LoopCoder-V2 release directory, as published, loads in PyTorch.

Random checkpoints written in the release's exact layout (its config.json fields and model_type,
an auto_map naming only its AutoConfig, bf16 safetensors, one file or shards, the gate under
`loop_gate_proj` or `plt_gate`, a config with or without the optional fields) are adopted, then
loaded with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and compared with
plt_jax's import of the same directory.
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from plt_jax.hf import adopt
from plt_jax.hf import convert
from helpers import REPO, release_config

ROOT = REPO
RELEASE = release_config(transformers_version='4.51.3', plt_window_size=[4, 0])
# name -> (config changes, None = drop the field; gate tensor name; shard count)
VARIANTS = {
    'hidden_gate_alias_single': ({}, 'loop_gate_proj', 1),
    # absent fields take the configuration class's defaults: the query gate, scales 1.0
    'defaults_query_gate_sharded': (
        {'plt_gate_use_hidden_states': None, 'plt_emb_scale': None, 'plt_hidden_scale': None,
         'plt_num_loops': 3, 'plt_window_size': [2, 0], 'num_key_value_heads': 1},
        'plt_gate', 3),
}


def write_release(path, name, seed=0):
  """A release-layout directory with random bf16 weights; returns its config dict."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  changes, gate_name, shards = VARIANTS[name]
  hf = dict(RELEASE)
  for k, v in changes.items():
    if v is None:
      hf.pop(k)
    else:
      hf[k] = v
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  with open(os.path.join(path, 'generation_config.json'), 'w') as f:
    json.dump({'bos_token_id': 1, 'eos_token_id': 2}, f)
  cfg = convert.model_config_from_hf(hf)
  rng = np.random.RandomState(seed)
  tensors = {}
  for key, shape in convert.expected_hf_shapes(cfg).items():
    base = 1.0 if key.endswith('norm.weight') else 0.0
    scale = 0.6 if 'plt_gate' in key else 0.2
    tensors[key.replace('.plt_gate.', f'.{gate_name}.')] = (
        base + scale * rng.randn(*shape)).astype(ml_dtypes.bfloat16)
  names = list(tensors)
  if shards == 1:
    save_file(tensors, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
  else:
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
      fn = f'model-{i + 1:05d}-of-{shards:05d}.safetensors'
      save_file({names[j]: tensors[names[j]] for j in part}, os.path.join(path, fn),
                metadata={'format': 'pt'})
      weight_map.update({names[j]: fn for j in part})
    with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {'total_size': 0}, 'weight_map': weight_map}, f)
  return hf


def snapshot(path):
  """name -> sha256 of every file under path."""
  out = {}
  for root, _, files in os.walk(path):
    for fn in files:
      p = os.path.join(root, fn)
      with open(p, 'rb') as f:
        out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
  return out


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.adopt_release', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def adopted(tmp_path_factory):
  """name -> (directory, its files before adoption)."""
  out = {}
  for name in VARIANTS:
    d = str(tmp_path_factory.mktemp(f'release_{name}_{os.getpid()}'))
    write_release(d, name, seed=len(out))
    before = snapshot(d)
    changed = adopt.adopt_release(d)
    assert sorted(changed) == ['config.json', 'configuration_plt.py', 'modeling_plt.py']
    out[name] = (d, before)
  return out


@pytest.mark.parametrize('name', list(VARIANTS))
def test_adoption_changes_only_auto_map_and_adds_two_files(adopted, name):
  d, before = adopted[name]
  after = snapshot(d)
  assert set(after) == set(before) | {'configuration_plt.py', 'modeling_plt.py'}
  for fn, digest in before.items():
    if fn != 'config.json':
      assert after[fn] == digest, fn   # weights, index and generation config untouched
  with open(os.path.join(d, 'config.json')) as f:
    hf = json.load(f)
  old = dict(RELEASE)
  assert hf['model_type'] == 'iquestpltcoder'
  assert hf['auto_map'] == {'AutoConfig': 'configuration_plt.PLTConfig',
                            'AutoModel': 'modeling_plt.PLTModel',
                            'AutoModelForCausalLM': 'modeling_plt.PLTForCausalLM'}
  changes = VARIANTS[name][0]
  for k, v in old.items():
    if k != 'auto_map' and changes.get(k, v) is not None:
      assert hf[k] == changes.get(k, v), k
  with open(os.path.join(d, 'configuration_plt.py')) as f:
    written = f.read()
  with open(os.path.join(ROOT, 'plt_jax/hf/torch_src/configuration_plt.py')) as f:
    ours = f.read()
  assert written == ours.replace('model_type = "plt_llama"', 'model_type = "iquestpltcoder"')


@pytest.mark.parametrize('name', list(VARIANTS))
def test_second_run_changes_nothing(adopted, name):
  d, _ = adopted[name]
  before = snapshot(d)
  proc = run_cli(d)
  assert proc.returncode == 0, proc.stderr
  assert 'nothing changed' in proc.stdout
  assert snapshot(d) == before


@pytest.mark.parametrize('case', ['no_config', 'plain_llama', 'weights_mismatch', 'no_weights'])
def test_non_release_directory_is_refused_untouched(tmp_path, case):
  d = tmp_path / case
  write_release(str(d), 'hidden_gate_alias_single')
  if case == 'no_config':
    os.remove(d / 'config.json')
  elif case == 'plain_llama':
    hf = {k: v for k, v in RELEASE.items() if not k.startswith('plt_')}
    (d / 'config.json').write_text(json.dumps(hf))
  elif case == 'weights_mismatch':  # the config says R=2 query gate; the weights have the hidden
    hf = {**RELEASE, 'plt_gate_use_hidden_states': False}
    (d / 'config.json').write_text(json.dumps(hf))
  else:
    os.remove(d / 'model.safetensors')
  before = snapshot(d)
  proc = run_cli(str(d))
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('adopt_release: error: ') and (
      'is not a LoopCoder-V2 layout directory' in lines[0]), proc.stderr
  assert snapshot(d) == before


# ----------------------------------------------------------------------------- loading in PyTorch
@pytest.fixture(scope='module')
def tc():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield torch, transformers
  torch.set_num_threads(threads)


def load(tc, d, **kw):
  _, transformers = tc
  return transformers.AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, **kw).eval()


@pytest.mark.parametrize('name', list(VARIANTS))
def test_adopted_release_matches_plt_jax_import(tc, adopted, name):
  """float32 logits equal plt_jax's import of the same directory; greedy generate matches."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from plt_jax import hf as hf_lib  # pylint: disable=g-import-not-at-top
  torch, _ = tc
  d, _ = adopted[name]
  tm = load(tc, d, dtype=torch.float32)
  jm, _ = hf_lib.load_hf_checkpoint(d)
  c = tm.config
  assert c.model_type == 'iquestpltcoder'
  assert (c.plt_num_loops, c.plt_window, c.plt_gate_use_hidden_states) == (
      jm.cfg.num_loops, jm.cfg.window_size, jm.cfg.gate_mode == 'hidden')
  if name.startswith('defaults'):
    assert jm.cfg.gate_mode == 'query' and (jm.cfg.emb_scale, jm.cfg.hidden_scale) == (1.0, 1.0)
  toks = np.random.RandomState(3).randint(0, 97, (2, 13))
  with torch.no_grad():
    got = tm(torch.as_tensor(toks)).logits.numpy()
  want = np.asarray(jm(jnp.asarray(toks, jnp.int32)))
  assert np.abs(got - want).max() < 1e-4
  # greedy: plt_jax's full forward, one token at a time, against generate's cached decoding
  prompt = toks[:1, :6]
  seq = prompt.copy()
  for _ in range(7):
    nxt = np.asarray(jm(jnp.asarray(seq, jnp.int32)))[:, -1].argmax(-1)
    seq = np.concatenate([seq, nxt[:, None]], 1)
  with torch.no_grad():
    prompt = torch.as_tensor(prompt)   # holds token 0: say it is not padding
    out = tm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=7,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
  np.testing.assert_array_equal(out.numpy(), seq)


@pytest.mark.parametrize('name', list(VARIANTS))
def test_adopted_release_loads_bf16_and_decodes_one_pass_per_token(tc, adopted, name):
  torch, _ = tc
  d, _ = adopted[name]
  tm = load(tc, d, dtype=torch.bfloat16)
  assert tm.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  stored = {}
  for fn in os.listdir(d):
    if fn.endswith('.safetensors'):
      stored.update(load_file(os.path.join(d, fn)))
  gate = [k for k in stored if 'gate_proj.weight' not in k and ('loop_gate_proj' in k or
                                                                 'plt_gate' in k)][0]
  ours = gate.replace('.loop_gate_proj.', '.plt_gate.')
  np.testing.assert_array_equal(tm.state_dict()[ours].float().numpy(),
                                stored[gate].astype(np.float32))   # the released values, exactly
  calls = []
  hook = tm.model.layers[0].register_forward_hook(lambda m, a, o: calls.append(1))
  try:
    with torch.no_grad():
      out = tm.generate(torch.tensor([[5, 9, 11, 3]]), max_new_tokens=6, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
  finally:
    hook.remove()
  assert out.shape == (1, 10)
  assert len(calls) == tm.config.plt_num_loops + 5   # prefill R passes, then one per token
