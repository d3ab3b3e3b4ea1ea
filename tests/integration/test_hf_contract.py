"""The exported PyTorch PLT against what transformers' users and tools expect of a causal LM,
where the answer is a number (transformers' own common tests run in test_hf_mixins.py).

Checked on tiny random PLTs (R=2 hidden gate, R=3 query gate with MQA, vanilla R=2, and R=1
against transformers' own Llama), with windows small enough for the ring to wrap:

  training:   the Trainer's `num_items_in_batch` (gradient accumulation), `shift_labels`, packed
              rows (position_ids restarting inside a row, TRL's padding-free batches)
  outputs:    hidden_states and attentions (forward and generate), return_dict=False
  generation: a returned cache passed back to generate, one pass per decoded token, assisted and
              prompt-lookup decoding refused with the reason, the op count of a decode step
  export:     torch.export with an attention mask
Numbers are checked against plt_jax (the JAX model is the reference) or against Llama.
"""
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from plt_jax.hf import convert  # pylint: disable=g-import-not-at-top,wrong-import-position
from plt_jax.hf import importer  # pylint: disable=g-import-not-at-top,wrong-import-position
from plt_jax.hf.torch_src import configuration_plt  # pylint: disable=wrong-import-position
from plt_jax.hf.torch_src import modeling_plt  # pylint: disable=wrong-import-position

PLTConfig = configuration_plt.PLTConfig
PLTForCausalLM = modeling_plt.PLTForCausalLM

BASE = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=10_000.0, rms_norm_eps=1e-6,
            bos_token_id=None, eos_token_id=None, pad_token_id=0)
CONFIGS = {
    'r2_hidden': dict(plt_num_loops=2, plt_window_size=[2, 0], plt_gate_use_hidden_states=True),
    'r3_query': dict(plt_num_loops=3, plt_window_size=[3, 0], plt_gate_use_hidden_states=False,
                     num_key_value_heads=1, plt_emb_scale=0.8, plt_hidden_scale=0.5),
    'vanilla_r2': dict(plt_num_loops=2, plt_loop_mode='vanilla'),
}
TOL = 1e-4
REFUSAL = 'PLT does not support assisted or prompt-lookup decoding'


@pytest.fixture(scope='module', autouse=True)
def one_thread():
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # tiny ops: OpenMP barriers cost more than they save on a busy host
  yield
  torch.set_num_threads(threads)


def make_torch(name, seed=0, **overrides):
  """A random PLT with every parameter moved off its init (gates and norms included)."""
  config = PLTConfig(**{**BASE, **CONFIGS.get(name, {}), **overrides})
  torch.manual_seed(seed)
  model = PLTForCausalLM(config)
  with torch.no_grad():
    for n, p in model.named_parameters():
      p.add_((0.3 if ('norm' in n or 'gate' in n) else 0.1) * torch.randn_like(p))
  return model.eval()


def jax_twin(model):
  """The plt_jax model with the same weights (float32)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  cfg = convert.model_config_from_hf(model.config.to_dict())
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  graphdef, state = importer.hf_tensors_to_state(tensors, cfg)
  return nnx.merge(graphdef, state)


def tokens(shape, seed, vocab=BASE['vocab_size']):
  return torch.as_tensor(np.random.RandomState(seed).randint(1, vocab, shape), dtype=torch.long)


def cache_field(output):
  return 'cache' if 'cache' in type(output).__dataclass_fields__ else 'past_key_values'


def no_eos():
  return dict(eos_token_id=None, pad_token_id=0, do_sample=False)


# ----------------------------------------------------------------------------------------- training
@pytest.mark.parametrize('name', list(CONFIGS))
def test_num_items_in_batch_makes_accumulation_equal_one_batch(name):
  """Two micro-batches with the Trainer's num_items_in_batch give the gradient of one batch."""
  model = make_torch(name).train()
  ids = tokens((4, 11), seed=1)
  labels = ids.clone()
  labels[0, :6] = -100   # uneven target counts per micro-batch: a mean of means would differ
  labels[3, 2:4] = -100
  model.zero_grad()
  model(ids, labels=labels).loss.backward()
  full = [p.grad.clone() for p in model.parameters()]
  model.zero_grad()
  n_items = int((labels[:, 1:] != -100).sum())
  for half in (slice(0, 2), slice(2, 4)):
    model(ids[half], labels=labels[half], num_items_in_batch=torch.tensor(n_items)).loss.backward()
  for a, b in zip(full, (p.grad for p in model.parameters())):
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_trainer_gradient_accumulation_matches_one_batch(tmp_path):
  """The HF Trainer itself: 2 accumulated batches of 2 update like 1 batch of 4 (plain SGD)."""
  pytest.importorskip('accelerate')
  ids = tokens((4, 9), seed=2)
  labels = ids.clone()
  labels[1, :5] = -100
  data = [{'input_ids': ids[i], 'labels': labels[i]} for i in range(4)]

  def trained(batch, accumulation):
    model = make_torch('r2_hidden').train()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f'b{batch}'), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.5, optim='sgd',
        lr_scheduler_type='constant', weight_decay=0.0, max_grad_norm=0.0, report_to=[],
        save_strategy='no', logging_strategy='no', use_cpu=True, seed=0,
        dataloader_num_workers=0)
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    return model

  start = make_torch('r2_hidden')
  one, two = trained(4, 1), trained(2, 2)
  for (n, p0), p1, p2 in zip(start.named_parameters(), one.parameters(), two.parameters()):
    step1, step2 = (p1 - p0).detach(), (p2 - p0).detach()
    assert step1.abs().max() > 0, n
    torch.testing.assert_close(step2, step1, rtol=1e-3, atol=1e-6, msg=n)


def test_shift_labels_replace_labels():
  """shift_labels (already aligned with the logits) are the targets; labels are then ignored."""
  model = make_torch('r2_hidden')
  ids = tokens((2, 10), seed=3)
  shift = tokens((2, 10), seed=4)
  shift[0, -1] = -100
  with torch.no_grad():
    out = model(ids, shift_labels=shift, labels=tokens((2, 10), seed=5))
    other = model(ids, shift_labels=shift, labels=tokens((2, 10), seed=6))
    moved = model(ids, shift_labels=tokens((2, 10), seed=7))
    summed = model(ids, shift_labels=shift, num_items_in_batch=7)
  want = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 61), shift.reshape(-1),
                                           ignore_index=-100)
  torch.testing.assert_close(out.loss, want)
  torch.testing.assert_close(other.loss, out.loss)
  assert abs(float(moved.loss - out.loss)) > 1e-3
  torch.testing.assert_close(summed.loss, want * 19 / 7)


@pytest.mark.parametrize('name', list(CONFIGS))
def test_packed_rows_match_jax_segments(name):
  """position_ids restarting inside a row: each sequence attends to itself and starts its own CLP
  shift, as plt_jax does with segment ids; the second sequence equals itself alone."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  model = make_torch(name)
  jm = jax_twin(model)
  lens = (7, 10)   # both longer than the window
  ids = tokens((2, sum(lens)), seed=8)
  pos = torch.cat([torch.arange(n) for n in lens])[None].expand(2, -1)
  seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)])[None].repeat(2, 0)
  with torch.no_grad():
    packed = model(ids, position_ids=pos).logits.numpy()
    alone = model(ids[:, lens[0]:]).logits.numpy()
  ref = np.asarray(jm(jnp.asarray(ids.numpy()), jnp.asarray(pos.numpy()), jnp.asarray(seg)))
  assert np.abs(packed - ref).max() < TOL
  assert np.abs(packed[:, lens[0]:] - alone).max() < TOL
  with torch.no_grad():  # the mistake this prevents: the same row read as one sequence differs
    unpacked = model(ids).logits.numpy()
  assert np.abs(unpacked[:, lens[0]:] - alone).max() > 1e-2


def test_position_restart_with_a_cache_is_refused():
  model = make_torch('r2_hidden')
  with torch.no_grad():
    out = model(tokens((1, 5), seed=9), use_cache=True)
    with pytest.raises(ValueError, match='PLT: position_ids restart inside a chunk'):
      model(tokens((1, 3), seed=10), position_ids=torch.tensor([[5, 0, 1]]),
            **{cache_field(out): getattr(out, cache_field(out))})


# ------------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize('name', list(CONFIGS))
def test_hidden_states_per_loop_match_jax(name):
  """hidden_states: R * (L + 1) tensors, loop by loop (the loop's input, then each layer's
  output); the last is last_hidden_state."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  model = make_torch(name)
  c = model.config
  ids = tokens((2, 9), seed=11)
  with torch.no_grad():
    out = model.model(ids, output_hidden_states=True)
  hs = out.hidden_states
  r_total, n_layers = c.plt_num_loops, c.num_hidden_layers
  assert len(hs) == r_total * (n_layers + 1)
  assert all(h.shape == (2, 9, c.hidden_size) for h in hs)
  _, loops = jax_twin(model)(jnp.asarray(ids.numpy()), return_loops=True)
  for r, lo in enumerate(loops):
    assert np.abs(hs[r * (n_layers + 1)].numpy() - np.asarray(lo.inputs)).max() < TOL, r
    if r < r_total - 1:
      assert np.abs(hs[r * (n_layers + 1) + n_layers].numpy() - np.asarray(lo.hidden)).max() < TOL
  torch.testing.assert_close(hs[-1], out.last_hidden_state)
  torch.testing.assert_close(hs[0], model.model.embed_tokens(ids))


@pytest.mark.parametrize('name', list(CONFIGS))
def test_attentions_per_loop_match_jax(name):
  """attentions: R * L maps [B, H, S, S]; G-SWA loops give g * P_global + (1 - g) * P_window."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  model = make_torch(name)
  c = model.config
  ids = tokens((2, 9), seed=12)
  with torch.no_grad():
    attn = model(ids, output_attentions=True).attentions
  assert len(attn) == c.plt_num_loops * c.num_hidden_layers
  _, loops = jax_twin(model)(jnp.asarray(ids.numpy()), return_loops=True, capture_attention=True)
  i = 0
  for lo in loops:
    for layer in lo.layers:
      if isinstance(layer.probs, tuple):
        g = np.asarray(layer.gate).transpose(0, 2, 1)[..., None]      # [B, H, S, 1]
        want = g * np.asarray(layer.probs[0]) + (1 - g) * np.asarray(layer.probs[1])
      else:
        want = np.asarray(layer.probs)
      got = attn[i].numpy()
      assert got.shape == (2, c.num_attention_heads, 9, 9)
      assert np.abs(got - want).max() < TOL, i
      np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
      i += 1


def test_r1_hidden_states_and_attentions_equal_llama(tmp_path):
  """R = 1 is Llama: the same hidden_states and attentions as transformers' own LlamaForCausalLM."""
  model = make_torch('r1', plt_num_loops=1)
  model.save_pretrained(tmp_path)
  llama = transformers.LlamaForCausalLM.from_pretrained(
      tmp_path, attn_implementation='eager').eval()
  ids = tokens((2, 8), seed=13)
  with torch.no_grad():
    a = model(ids, output_hidden_states=True, output_attentions=True)
    b = llama(ids, output_hidden_states=True, output_attentions=True)
  assert len(a.hidden_states) == len(b.hidden_states) == 3
  assert len(a.attentions) == len(b.attentions) == 2
  for x, y in zip(a.hidden_states + a.attentions, b.hidden_states + b.attentions):
    torch.testing.assert_close(x, y, rtol=1e-5, atol=2e-5)


def test_return_dict_false_gives_tuples_as_llama(tmp_path):
  model = make_torch('r1', plt_num_loops=1)
  model.save_pretrained(tmp_path)
  llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
  ids = tokens((1, 6), seed=14)
  with torch.no_grad():
    for kw in (dict(), dict(labels=ids), dict(use_cache=False), dict(output_hidden_states=True)):
      a, b = model(ids, return_dict=False, **kw), llama(ids, return_dict=False, **kw)
      assert isinstance(a, tuple) and len(a) == len(b), kw
      torch.testing.assert_close(a[1 if 'labels' in kw else 0], b[1 if 'labels' in kw else 0],
                                 rtol=1e-5, atol=2e-5)
    assert isinstance(model.model(ids, return_dict=False), tuple)
  plt3 = make_torch('r3_query')
  plt3.config.return_dict = False
  with torch.no_grad():
    out = plt3(ids)
  assert isinstance(out, tuple) and out[0].shape == (1, 6, 61)


@pytest.mark.parametrize('name', list(CONFIGS))
def test_generate_returns_hidden_states_and_attentions(name):
  model = make_torch(name)
  c = model.config
  ids = tokens((2, 5), seed=15)
  with torch.no_grad():
    out = model.generate(ids, max_new_tokens=4, output_hidden_states=True,
                         output_attentions=True, return_dict_in_generate=True, **no_eos())
    plain = model.generate(ids, max_new_tokens=4, **no_eos())
    full = model.model(out.sequences[:, :-1], output_hidden_states=True)
  torch.testing.assert_close(out.sequences, plain)
  n = c.plt_num_loops * (c.num_hidden_layers + 1)
  assert len(out.hidden_states) == len(out.attentions) == 4
  for step, (hs, at) in enumerate(zip(out.hidden_states, out.attentions)):
    width = 5 if step == 0 else 1
    keys = 5 + step
    assert len(hs) == n and all(h.shape == (2, width, c.hidden_size) for h in hs)
    assert all(a.shape == (2, c.num_attention_heads, width, keys) for a in at)
    for got, want in zip(hs, full.hidden_states):  # each step's states are the full pass's
      torch.testing.assert_close(got, want[:, keys - width:keys], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize('name', list(CONFIGS))
def test_returned_cache_continues_generate(name):
  """A cache returned by generate, passed back with the sequence so far, continues it exactly."""
  model = make_torch(name)
  ids = tokens((2, 6), seed=16)
  mask = torch.ones_like(ids)
  mask[1, :2] = 0   # left padding
  with torch.no_grad():
    first = model.generate(ids, attention_mask=mask, max_new_tokens=5,
                           return_dict_in_generate=True, **no_eos())
    cache = getattr(first, cache_field(first))
    assert cache.get_seq_length() == 10 and not any(cache.is_linear)
    seq = first.sequences
    more = model.generate(seq, attention_mask=torch.cat([mask, torch.ones(2, 5, dtype=torch.long)],
                                                        1),
                          max_new_tokens=4, **{cache_field(first): cache}, **no_eos())
    whole = model.generate(ids, attention_mask=mask, max_new_tokens=9, **no_eos())
  torch.testing.assert_close(more, whole)


@pytest.mark.parametrize('name', ['r2_hidden', 'r3_query'])
def test_decode_step_is_one_pass_through_the_layers(name):
  """Each decoded token runs the shared layers once (the R loops as rows), not R times."""
  model = make_torch(name)
  calls = []
  handle = model.model.layers[0].register_forward_hook(lambda m, a, o: calls.append(1))
  try:
    with torch.no_grad():
      model.generate(tokens((1, 5), seed=17), max_new_tokens=6, **no_eos())
  finally:
    handle.remove()
  assert len(calls) == model.config.plt_num_loops + 5   # prefill: R passes; then 1 per token


def test_decode_step_op_count_near_llama(tmp_path):
  """The R = 2 decode step issues at most 1.5x the torch ops of transformers' Llama step."""
  from experiments.bench import torch_timing as timing  # pylint: disable=g-import-not-at-top
  r1 = make_torch('r1', plt_num_loops=1)
  r1.save_pretrained(tmp_path)
  llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
  plt2 = make_torch('r2_hidden')
  ids = tokens((1, 12), seed=18)
  ops_llama = timing.decode_step_ops(llama, ids)
  ops_plt = timing.decode_step_ops(plt2, ids)
  assert ops_llama['top_level'] > 20
  assert ops_plt['top_level'] <= 1.5 * ops_llama['top_level'], (ops_plt, ops_llama)


def test_assisted_and_prompt_lookup_decoding_are_refused():
  model = make_torch('r2_hidden')
  ids = tokens((1, 6), seed=19)
  with pytest.raises(NotImplementedError, match=REFUSAL):
    model.generate(ids, max_new_tokens=3, prompt_lookup_num_tokens=2, **no_eos())
  with pytest.raises(NotImplementedError, match='window ring'):
    model.generate(ids, max_new_tokens=3, assistant_model=make_torch('r2_hidden', seed=1),
                   **no_eos())


def test_foreign_cache_and_gradient_checkpointing_are_refused():
  model = make_torch('r2_hidden')
  with pytest.raises(ValueError, match='PLT keeps its own PLTCache'):
    model(tokens((1, 4), seed=20), past_key_values=transformers.DynamicCache())
  with pytest.raises(ValueError,
                     match='PLTForCausalLM does not support (gradient|activation) checkpointing'):
    model.gradient_checkpointing_enable()


def test_inputs_embeds_and_an_all_ones_mask_change_nothing():
  model = make_torch('r3_query')
  ids = tokens((2, 8), seed=21)
  with torch.no_grad():
    a = model(ids).logits
    b = model(inputs_embeds=model.model.embed_tokens(ids)).logits
    c = model(ids, attention_mask=torch.ones_like(ids)).logits
  torch.testing.assert_close(b, a)
  torch.testing.assert_close(c, a)


def test_save_and_reload_keep_the_outputs(tmp_path):
  model = make_torch('r3_query')
  model.save_pretrained(tmp_path)
  again = PLTForCausalLM.from_pretrained(tmp_path).eval()
  ids = tokens((1, 9), seed=22)
  with torch.no_grad():
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize('name', ['r2_hidden', 'vanilla_r2'])
def test_torch_export_with_an_attention_mask(name):
  """torch.export traces the forward with a padding mask (no data-dependent branch on it)."""
  model = make_torch(name)
  ids = tokens((2, 7), seed=23)
  mask = torch.ones_like(ids)
  mask[0, :3] = 0
  kwargs = dict(input_ids=ids, attention_mask=mask, use_cache=False)
  program = torch.export.export(model, (), kwargs)
  with torch.no_grad():
    want = model(**kwargs).logits
    got = program.module()(**kwargs)
  got = got['logits'] if isinstance(got, dict) else got.logits
  torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
  mask2 = torch.ones_like(ids)
  mask2[1, :2] = 0   # another mask through the same program
  with torch.no_grad():
    want2 = model(ids, attention_mask=mask2, use_cache=False).logits
    got2 = program.module()(input_ids=ids, attention_mask=mask2, use_cache=False)
  got2 = got2['logits'] if isinstance(got2, dict) else got2.logits
  torch.testing.assert_close(got2, want2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('rows', [2, 5, 8, 9])
def test_few_row_products_equal_the_plain_layers(rows):
  """Decode's few-row path (W x^T on the CPU) gives the layers' own products, and is taken only
  for 2..8 float32 rows of plain, hook-free layers."""
  model = make_torch('r3_query', seed=21)
  layer = model.model.layers[0]
  x = torch.randn(1, rows, model.config.hidden_size)
  with torch.no_grad():
    fast = layer.mlp(x)
    plain = layer.mlp.down_proj(torch.nn.functional.silu(layer.mlp.gate_proj(x))
                                * layer.mlp.up_proj(x))
  np.testing.assert_allclose(fast.numpy(), plain.numpy(), rtol=1e-5, atol=1e-6)
  mlp = (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
  assert modeling_plt._few_rows(x, rows, *mlp) == (rows <= 8)  # pylint: disable=protected-access
  assert not modeling_plt._few_rows(x.double(), rows, *mlp)  # pylint: disable=protected-access
  handle = layer.mlp.up_proj.register_forward_hook(lambda *a: None)
  try:
    assert not modeling_plt._few_rows(x, rows, *mlp)  # pylint: disable=protected-access
  finally:
    handle.remove()
