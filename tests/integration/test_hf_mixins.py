"""transformers' own common model tests on the exported PLT, as transformers runs them on Llama.

`ModelTesterMixin` and `ConfigTester` come from the sdist of the installed transformers release
(tests/integration/hf_upstream.py fetches it once per machine); a missing sdist skips this module
with the reason. Three tiny PLTs, each with a window small enough for its ring to wrap within the
tester's sequences: R=2 with the hidden-state gate, R=3 with the query gate and MQA, and vanilla
loops R=2.

What PLT returns where Llama returns one tensor per layer (documented in modeling_plt.py):
hidden_states holds R * (L + 1) tensors and attentions R * L, loop by loop; the tester says so.

Every mixin test that does not apply is skipped in `SKIPS` with its reason. Generation is checked
by tests/integration/test_hf_generation.py, since `GenerationTesterMixin` is not in the sdist.
"""
import unittest

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import hf_upstream  # pylint: disable=g-import-not-at-top,wrong-import-position
from plt_jax.hf.torch_src import configuration_plt  # pylint: disable=wrong-import-position
from plt_jax.hf.torch_src import modeling_plt  # pylint: disable=wrong-import-position

try:
  ModelTesterMixin, ConfigTester = hf_upstream.load(transformers.__version__)
except Exception as e:  # pylint: disable=broad-except
  pytest.skip(f"transformers {transformers.__version__}'s own tests are not available: {e}",
              allow_module_level=True)

VARIANTS = {
    'R2Hidden': dict(plt_num_loops=2, plt_window_size=[3, 0], plt_gate_use_hidden_states=True),
    'R3Query': dict(plt_num_loops=3, plt_window_size=[4, 0], plt_gate_use_hidden_states=False,
                    num_key_value_heads=1, plt_emb_scale=0.8, plt_hidden_scale=0.5),
    'Vanilla2': dict(plt_num_loops=2, plt_loop_mode='vanilla'),
}

# Mixin tests that do not apply to PLT, or to a CPU-only run, with the reason.
SKIPS = {
    'test_training_gradient_checkpointing':
        'PLT refuses gradient checkpointing: its layers are shared across loops and write the '
        'cache inside them (the refusal is tested in test_hf_contract.py)',
    'test_training_gradient_checkpointing_use_reentrant_false': 'as above',
    'test_training_gradient_checkpointing_use_reentrant_true': 'as above',
    'test_gradient_checkpointing_enable_disable': 'as above',
    'test_gradient_checkpointing_backward_compatibility': 'as above',
    'test_peft_gradient_checkpointing_enable_disable': 'as above',
    'test_enable_input_require_grads_with_gradient_checkpointing': 'as above',
    'test_generation_tester_mixin_inheritance':
        "transformers' GenerationTesterMixin is not in its sdist; its checks are written out in "
        'tests/integration/test_hf_generation.py',
    'test_num_layers_is_small':
        "the tester's num_hidden_layers counts layer applications (R x L = 4 or 6), which is "
        'what the attention-output checks compare with; each config has 2 layers, within the '
        "guard's limit",
}


class PLTModelTester:
  """Tiny configs and inputs in the shape transformers' common tests ask of a model tester."""

  def __init__(self, parent, variant: dict, batch_size=3, seq_length=9):
    self.parent = parent
    self.variant = variant
    self.batch_size = batch_size
    self.seq_length = seq_length
    self.vocab_size = 61
    self.hidden_size = 32
    self.num_attention_heads = 4
    self.intermediate_size = 40
    self.config_layers = 2
    self.loops = variant['plt_num_loops']
    # One attention map per layer application and one hidden state per layer input/output.
    self.num_hidden_layers = self.loops * self.config_layers
    self.expected_num_hidden_layers = self.loops * (self.config_layers + 1)
    self.is_training = True
    self.use_labels = True
    self.pad_token_id = 0

  def get_config(self):
    base = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size, num_hidden_layers=self.config_layers,
                num_attention_heads=self.num_attention_heads, num_key_value_heads=2,
                rope_theta=10_000.0, rms_norm_eps=1e-6, pad_token_id=self.pad_token_id,
                bos_token_id=1, eos_token_id=2, initializer_range=0.02)
    return configuration_plt.PLTConfig(**{**base, **self.variant})

  def prepare_config_and_inputs_for_common(self):
    rng = np.random.RandomState(0)
    ids = torch.as_tensor(rng.randint(3, self.vocab_size, (self.batch_size, self.seq_length)))
    # Right padding of different lengths, as Llama's tester builds it.
    mask = torch.tril(torch.ones(self.batch_size, self.seq_length, dtype=torch.long),
                      diagonal=self.seq_length - self.batch_size)
    return self.get_config(), {'input_ids': ids, 'attention_mask': mask}


class _PLTCommon(ModelTesterMixin):
  all_model_classes = (modeling_plt.PLTModel, modeling_plt.PLTForCausalLM)
  variant: dict = {}
  test_torch_exportable = False  # the ExportTesterMixin is not in the sdist

  def setUp(self):
    name = self._testMethodName
    if name in SKIPS:
      self.skipTest(SKIPS[name])
    self.model_tester = PLTModelTester(self, self.variant)
    self.config_tester = ConfigTester(self, config_class=configuration_plt.PLTConfig,
                                      hidden_size=32, **self.variant)

  def test_config(self):
    self.config_tester.run_common_tests()

  # The mixin finds base models (no loss) and causal LMs (labels) through transformers' auto
  # mappings, where a trust_remote_code model is not registered; the two overrides say it here.
  def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
    inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels)
    if return_labels and model_class is modeling_plt.PLTForCausalLM:
      inputs['labels'] = inputs['input_ids'].clone()
    return inputs

  def test_training(self):
    self.all_model_classes = (modeling_plt.PLTForCausalLM,)
    super().test_training()


def _test_case(name: str, variant: dict):
  return type(f'PLT{name}ModelTest', (_PLTCommon, unittest.TestCase), {'variant': variant})


for _name, _variant in VARIANTS.items():
  globals()[f'PLT{_name}ModelTest'] = _test_case(_name, _variant)
del _name, _variant
