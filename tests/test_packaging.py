"""The installed distribution: only the plt_jax package, usable without the checkout.

A wheel is built from a copy of the working tree and inspected; installed into a plain directory it
must import (presets, kernels) from a process that cannot see the repository. The top-level
kernels/ directory is the package plt_jax.kernels (setup.py's package_dir; no symlink), under that
one name in a wheel, an editable install and a bare checkout alike. The import graph of the sources
must not reach configs/ or experiments/, must have no cycle, and plt_jax.kernels must stand on its
own.
"""
import ast
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, 'plt_jax')
HF_MODELING = ('plt_jax/hf/torch_src/modeling_plt.py', 'plt_jax/hf/torch_src/configuration_plt.py')
CHECKOUT_ONLY = ('configs', 'experiments', 'kernels')   # top-level names the library must not use
# Package directories that setup.py maps (package_dir): package path -> directory in the checkout.
PACKAGE_DIRS = {'plt_jax/kernels': 'kernels'}


def _version() -> str:
  with open(os.path.join(PKG, '__init__.py')) as f:
    return re.search(r"^__version__ = '([^']+)'", f.read(), re.M).group(1)


def _pip_env() -> dict:
  # Offline: the build needs setuptools from this environment only.
  return dict(os.environ, PIP_NO_INDEX='1', PIP_DISABLE_PIP_VERSION_CHECK='1',
              PIP_NO_INPUT='1')


def _copy_tree(dst: str) -> str:
  """Copies the working tree without run outputs, build dirs and dot folders (.git, .venv)."""
  def ignore(directory, names):
    skip = {n for n in names if n in ('__pycache__', 'build', 'dist')
            or n.endswith(('.pyc', '.egg-info'))}
    if os.path.samefile(directory, REPO):
      skip |= {n for n in names if n.startswith('.') or n in ('runs', 'workdirs')}
    return skip
  # Symlinks stay links, as in a git clone.
  shutil.copytree(REPO, dst, symlinks=True, ignore=ignore)
  return dst


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> str:
  """A wheel of the working tree. It is built from a copy: setuptools' build/ keeps files of
  earlier builds (which would end up in the wheel) and would be shared by concurrent runs."""
  root = tmp_path_factory.mktemp('wheel')
  src = _copy_tree(str(root / 'src'))
  out = root / 'dist'
  proc = subprocess.run(
      [sys.executable, '-m', 'pip', 'wheel', '.', '--no-deps', '--no-build-isolation',
       '-w', str(out), '-q'],
      cwd=src, env=_pip_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  wheels = sorted(out.glob('*.whl'))
  assert len(wheels) == 1, wheels
  return str(wheels[0])


def _repo_path(rel: str) -> str:
  """A package path (plt_jax/kernels/ops.py) -> its path in the checkout (kernels/ops.py)."""
  for package, directory in PACKAGE_DIRS.items():
    if rel == package or rel.startswith(package + '/'):
      return directory + rel[len(package):]
  return rel


def _source_files() -> list:
  """The package's files as installed paths (plt_jax/...), kernels/ as plt_jax/kernels/."""
  found = []
  roots = [('plt_jax', PKG)] + [(p, os.path.join(REPO, d)) for p, d in PACKAGE_DIRS.items()]
  for package, root in roots:
    for directory, dirs, files in os.walk(root):
      rel_dir = os.path.relpath(directory, root).replace(os.sep, '/')
      prefix = package if rel_dir == '.' else f'{package}/{rel_dir}'
      dirs[:] = sorted(d for d in dirs
                       if d != '__pycache__' and f'{prefix}/{d}' not in PACKAGE_DIRS)
      found += [f'{prefix}/{name}' for name in sorted(files) if not name.endswith('.pyc')]
  return found


def test_kernels_directory_is_a_mapped_package_not_a_link():
  for package, directory in PACKAGE_DIRS.items():
    assert not os.path.lexists(os.path.join(REPO, package)), f'{package} must not exist (a link?)'
    assert os.path.isfile(os.path.join(REPO, directory, '__init__.py')), directory
  links = [os.path.relpath(os.path.join(d, n), REPO) for top in ('plt_jax', 'kernels')
           for d, dirs, files in os.walk(os.path.join(REPO, top)) for n in dirs + files
           if os.path.islink(os.path.join(d, n))]
  assert not links, f'symlinks in the package sources: {links}'
  sources = _source_files()
  assert 'plt_jax/kernels/ops.py' in sources and 'plt_jax/kernels/cpu/rows_matmul.cc' in sources
  assert _repo_path('plt_jax/kernels/cpu/rows_matmul.cc') == 'kernels/cpu/rows_matmul.cc'
  assert _repo_path('plt_jax/presets.py') == 'plt_jax/presets.py'


def test_wheel_holds_only_plt_jax(wheel):
  dist_info = f'plt_jax-{_version()}.dist-info'
  with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    top_level = zf.read(f'{dist_info}/top_level.txt').decode().split()
  tops = collections.Counter(n.split('/')[0] + ('/' if '/' in n else '') for n in names)
  assert set(tops) == {'plt_jax/', f'{dist_info}/'}, tops
  assert top_level == ['plt_jax'], top_level
  required = ['plt_jax/kernels/__init__.py', 'plt_jax/kernels/ops.py', 'plt_jax/kernels/masks.py',
              'plt_jax/kernels/cpu/rows_matmul.cc', 'plt_jax/kernels/cpu/decode_attention.cc',
              'plt_jax/kernels/cpu/parallel.h', 'plt_jax/kernels/cpu/simd.h',
              'plt_jax/presets.py', *HF_MODELING]
  missing = [n for n in required if n not in names]
  assert not missing, f'missing from the wheel: {missing}'
  # Every source file the package reads: all modules, and the CPU kernels' C++ sources.
  sources = [f for f in _source_files() if f.endswith(('.py', '.cc', '.h'))]
  missing = [f for f in sources if f not in names]
  assert not missing, f'in the package sources but not in the wheel: {missing}'
  # The kernels exactly once, at their package path (no top-level kernels/, no stale files).
  kernels = sorted(n for n in names if n.startswith('plt_jax/kernels/'))
  assert kernels == sorted(f for f in sources if f.startswith('plt_jax/kernels/')), kernels
  # Benchmarks are not library code: their flags would become a library API.
  benchmarks = [n for n in names if re.search(r'bench|profiling|timing', n.rsplit('/', 1)[-1])]
  assert not benchmarks, f'benchmark modules in the wheel: {benchmarks}'


# Runs with -S: no site-packages .pth files, so the checkout's editable finder is not installed.
_INSTALLED_CHECK = r'''
import importlib, json, os, sys, traceback
target, repo, deps = sys.argv[1], sys.argv[2], sys.argv[3:]
out = {'meta_path': [type(f).__name__ for f in sys.meta_path]}

def attempt(key, fn):
  try:
    out[key] = fn()
  except Exception:
    out[key] = 'ERROR ' + traceback.format_exc()

def preset():
  import plt_jax
  from plt_jax import presets
  from plt_jax.config import ModelConfig
  out['plt_jax_file'] = plt_jax.__file__
  cfg = presets.get_config('default', num_loops=2)
  model = ModelConfig.from_dict(cfg.model)
  return {'num_loops': model.num_loops, 'preset': cfg.preset,
          'sweep_variants': presets.sweep_config().sweep.variants}

def kernels():
  import plt_jax.kernels
  import plt_jax.kernels.masks
  import plt_jax.kernels.ops
  cpu = os.path.join(os.path.dirname(plt_jax.kernels.__file__), 'cpu')
  return {'ops_file': plt_jax.kernels.ops.__file__, 'cpu_sources': sorted(os.listdir(cpu))}

def checkout_only(name):
  try:
    module = importlib.import_module(name)
  except ImportError:
    return 'ImportError'
  return 'imported from ' + str(getattr(module, '__file__', None) or list(module.__path__))

def in_dir(path, directory):
  return os.path.realpath(path).startswith(os.path.realpath(directory) + os.sep)

attempt('preset', preset)
attempt('kernels', kernels)
out['checkout_only'] = {name: checkout_only(name) for name in ('configs', 'kernels', 'experiments')}
# The dependencies' site-packages may lie inside the checkout (a .venv there): not the checkout.
out['from_repo'] = sorted(
    name for name, m in list(sys.modules.items())
    if getattr(m, '__file__', None) and in_dir(m.__file__, repo)
    and not any(in_dir(m.__file__, d) for d in deps))
print('RESULT ' + json.dumps(out))
'''


def test_installed_wheel_works_without_the_checkout(wheel, tmp_path):
  target = tmp_path / 'site'
  proc = subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-compile', '-q',
       '--target', str(target), wheel],
      env=_pip_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  # Dependencies come from this environment's site-packages, plt_jax only from the target.
  deps = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ('purelib', 'platlib')))
  env = {k: v for k, v in os.environ.items() if not k.startswith('PYTHON')}
  env.update(PYTHONPATH=os.pathsep.join([str(target)] + deps), JAX_PLATFORMS='cpu',
             PYTHONDONTWRITEBYTECODE='1')
  outside = tmp_path / 'elsewhere'
  outside.mkdir()
  proc = subprocess.run([sys.executable, '-S', '-c', _INSTALLED_CHECK, str(target), REPO, *deps],
                        cwd=outside, env=env, capture_output=True, text=True, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
  r = json.loads(lines[-1][len('RESULT '):])

  assert not any('Editable' in f or 'editable' in f for f in r['meta_path']), r['meta_path']
  assert r['from_repo'] == [], f'modules loaded from the checkout: {r["from_repo"]}'
  assert not str(r['preset']).startswith('ERROR'), r['preset']
  assert os.path.realpath(r['plt_jax_file']).startswith(os.path.realpath(target) + os.sep), r
  assert r['preset'] == {'num_loops': 2, 'preset': 'default',
                         'sweep_variants': 'r1,r2,r3,r4,vanilla2'}, r['preset']
  assert r['checkout_only'] == {name: 'ImportError' for name in CHECKOUT_ONLY}, r['checkout_only']
  assert not str(r['kernels']).startswith('ERROR'), r['kernels']
  assert os.path.realpath(r['kernels']['ops_file']).startswith(os.path.realpath(target)), r
  assert 'rows_matmul.cc' in r['kernels']['cpu_sources'], r['kernels']


# Runs with -S as above: only the copied checkout on the path, no editable finder.
_CHECKOUT_CHECK = r"""
import json, os, sys, traceback
out = {}
import plt_jax.kernels
from plt_jax.kernels import masks, ops
from plt_jax import attention
out['files'] = [plt_jax.__file__, plt_jax.kernels.__file__, ops.__file__, attention.masks.__file__]
out['same_module'] = attention.masks is masks is sys.modules['plt_jax.kernels.masks']
import kernels
try:
  import kernels.ops
  out['top_level'] = 'kernels.ops loaded'
except ImportError as e:
  out['top_level'] = f'{kernels.__path__} {e}'
out['modules'] = sorted(m for m in sys.modules if m == 'kernels' or m.startswith('kernels.'))
print('RESULT ' + json.dumps(out))
"""


def test_bare_checkout_maps_kernels_once(tmp_path):
  """A checkout on PYTHONPATH, not installed: kernels/ is plt_jax.kernels, and only that."""
  src = tmp_path / 'checkout'
  src.mkdir()
  ignore = shutil.ignore_patterns('__pycache__', '*.pyc')
  for name in ('plt_jax', 'kernels'):
    shutil.copytree(os.path.join(REPO, name), src / name, ignore=ignore)
  shutil.copy(os.path.join(REPO, 'setup.py'), src / 'setup.py')
  deps = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ('purelib', 'platlib')))
  env = {k: v for k, v in os.environ.items() if not k.startswith('PYTHON')}
  # The checkout first and the working directory too, so that `import kernels` could find it.
  env.update(PYTHONPATH=os.pathsep.join([str(src)] + deps), JAX_PLATFORMS='cpu',
             PYTHONDONTWRITEBYTECODE='1')
  proc = subprocess.run([sys.executable, '-S', '-c', _CHECKOUT_CHECK], cwd=src, env=env,
                        capture_output=True, text=True, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
  r = json.loads(lines[-1][len('RESULT '):])
  want = [src / 'plt_jax' / '__init__.py', src / 'kernels' / '__init__.py',
          src / 'kernels' / 'ops.py', src / 'kernels' / 'masks.py']
  assert [os.path.realpath(f) for f in r['files']] == [os.path.realpath(w) for w in want], r
  assert r['same_module'] is True, r
  # `kernels` itself is an empty module (see the next test); nothing loads under it.
  assert r['top_level'] == "[] No module named 'kernels.ops'", r
  assert r['modules'] == ['kernels'], r


def test_top_level_kernels_name_is_an_empty_module_for_probes():
  """Run from the root, the checkout's kernels/ is also the top-level name `kernels` (an unrelated
  PyPI package). transformers imports that name to read a version: the import must succeed and
  report no version, and no submodule may load under that name."""
  code = ('import sys, kernels\n'
          'assert kernels.__path__ == [] and not hasattr(kernels, "__version__")\n'
          'try:\n  import kernels.ops\nexcept ImportError:\n  pass\n'
          'else:\n  sys.exit("kernels.ops loaded under the wrong name")\n'
          'from transformers.utils import import_utils\n'
          'assert import_utils.is_kernels_available() is False\n'
          'import plt_jax.kernels.masks\nprint("ok")\n')
  pytest.importorskip('transformers', reason='the probe under test is transformers\' own')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-2000:]


def test_editable_install_maps_kernels():
  """An editable install's finder (setuptools) resolves plt_jax.kernels to the checkout's
  kernels/ itself; a stale install from before the package_dir mapping fails here."""
  finders = [m for n, m in sorted(sys.modules.items())
             if n.startswith('__editable___plt_jax_') and n.endswith('_finder')]
  if not finders:
    pytest.skip('plt_jax is not installed editable (with a setuptools finder) in this environment')
  finder = getattr(finders[0], '_EditableFinder', None)
  if finder is None:
    pytest.skip(f'unknown setuptools editable finder layout in {finders[0].__name__}')
  if os.path.realpath(finder.find_spec('plt_jax').origin) != os.path.join(
      os.path.realpath(PKG), '__init__.py'):
    pytest.skip('the editable install is of another checkout')
  spec = finder.find_spec('plt_jax.kernels')
  assert spec is not None, 'reinstall: pip install -e . (the finder has no plt_jax.kernels)'
  assert os.path.realpath(spec.origin) == os.path.realpath(
      os.path.join(REPO, 'kernels', '__init__.py')), spec.origin


def _top_level_kernels_imports(tree) -> list:
  found = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
      names = [node.module]
    elif _constant_import(node):
      names = [_constant_import(node)]
    found += [(node.lineno, n) for n in names if n.split('.')[0] == 'kernels']
  return found


def test_kernels_are_imported_only_as_plt_jax_kernels():
  """One directory, one module: no file of the checkout (library, tools, experiments, tests,
  notebooks) imports the top-level name `kernels`."""
  bad = []
  for directory, dirs, files in os.walk(REPO):
    dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('runs', 'workdirs',
                                                                      '__pycache__', 'build')]
    for name in files:
      path = os.path.join(directory, name)
      rel = os.path.relpath(path, REPO)
      if name.endswith('.py'):
        with open(path) as f:
          sources = [f.read()]
      elif name.endswith('.ipynb'):
        with open(path) as f:
          cells = json.load(f)['cells']
        # Code cells, their shell and magic lines (!pip, %time) as `pass` at the same indent.
        sources = ['\n'.join(l[:len(l) - len(l.lstrip())] + 'pass'
                             if l.lstrip().startswith(('!', '%')) else l
                             for l in ''.join(c['source']).splitlines())
                   for c in cells if c['cell_type'] == 'code']
      else:
        continue
      for source in sources:
        bad += [f'{rel}:{line}: {target}'
                for line, target in _top_level_kernels_imports(ast.parse(source))]
  assert not bad, 'imports of the top-level `kernels` (use plt_jax.kernels):\n' + '\n'.join(bad)
  # The check sees what it looks for.
  assert _top_level_kernels_imports(ast.parse('import kernels.ops\nfrom kernels import masks\n'
                                              'importlib.import_module("kernels")')) == [
      (1, 'kernels.ops'), (2, 'kernels'), (3, 'kernels')]


# ---------------------------------------------------------------------------------------------
# The import graph of the sources.


def _modules() -> dict:
  """{module name: (path relative to the repo, is a package)} under plt_jax/."""
  modules = {}
  for rel in _source_files():
    if not rel.endswith('.py'):
      continue
    parts = rel[:-len('.py')].split('/')
    is_pkg = parts[-1] == '__init__'
    if is_pkg:
      parts = parts[:-1]
    modules['.'.join(parts)] = (rel, is_pkg)
  return modules


def _constant_import(node):
  """The module named by `importlib.import_module('x')` / `__import__('x')`, else None."""
  if not isinstance(node, ast.Call) or not node.args:
    return None
  f = node.func
  name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
  arg = node.args[0]
  if name in ('import_module', '__import__') and isinstance(arg, ast.Constant) \
      and isinstance(arg.value, str) and not arg.value.startswith('.'):
    return arg.value
  return None


def _imports(name: str, rel: str, is_pkg: bool, modules: dict) -> list:
  """[(target, is_attribute, line)] for every import in the file, at any depth.

  `from P import x` names the module P.x where that is a module, else P itself (x is then an
  attribute that P's __init__ must have defined)."""
  with open(os.path.join(REPO, _repo_path(rel))) as f:
    tree = ast.parse(f.read(), filename=rel)
  package = name if is_pkg else name.rpartition('.')[0]
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(a.name, False, node.lineno) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split('.')
        base = base[:len(base) - (node.level - 1)]
        source = '.'.join(base + ([node.module] if node.module else []))
      else:
        source = node.module
      if source == '__future__':
        continue
      inside = source.split('.')[0] == 'plt_jax'
      for a in node.names:
        sub = f'{source}.{a.name}'
        if a.name != '*' and sub in modules:
          found.append((sub, False, node.lineno))
        else:
          found.append((source, inside, node.lineno))
    else:
      target = _constant_import(node)
      if target:
        found.append((target, False, node.lineno))
  return sorted(found, key=lambda f: f[2])


def _graph():
  """(edges {importer: {imported: 'file:line'}}, checkout-only imports, modules).

  Importing plt_jax.a.b runs plt_jax/__init__, plt_jax/a/__init__ and then b, so an edge goes to
  each of them, except to the importer's own packages: those are already (being) initialised when
  the importer runs and an import of them only looks them up in sys.modules. Importing a name
  that is not a module from a package still depends on that package's __init__."""
  modules = _modules()
  edges = collections.defaultdict(dict)
  checkout_only = []
  for name, (rel, is_pkg) in sorted(modules.items()):
    own = {'.'.join(name.split('.')[:i]) for i in range(1, name.count('.') + 2)}
    for target, is_attribute, line in _imports(name, rel, is_pkg, modules):
      where = f'{_repo_path(rel)}:{line}'
      top = target.split('.')[0]
      if top in CHECKOUT_ONLY:
        checkout_only.append(f'{where}: {name} imports {target}')
      if top != 'plt_jax':
        continue
      parts = target.split('.')
      while '.'.join(parts) not in modules and len(parts) > 1:   # plt_jax.x.attr -> plt_jax.x
        parts.pop()
      resolved = '.'.join(parts)
      chain = ['.'.join(parts[:i]) for i in range(1, len(parts) + 1)]
      for dep in chain:
        if dep == name or (dep in own and not (is_attribute and dep == resolved)):
          continue
        edges[name].setdefault(dep, where)
  return edges, checkout_only, modules


def _cycles(edges) -> list:
  """The strongly connected components with more than one module (Tarjan), each as one cycle."""
  index, low, stack, on_stack, sccs = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, {})):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      scc = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        scc.append(w)
        if w == v:
          break
      if len(scc) > 1:
        sccs.append(set(scc))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  cycles = []
  for scc in sccs:
    start = min(scc)
    # The shortest way back to `start` inside the component (breadth first).
    prev, queue, last = {start: None}, collections.deque([start]), None
    while last is None:
      v = queue.popleft()
      if start in edges[v]:
        last = v
      for w in sorted(edges[v]):
        if w in scc and w not in prev:
          prev[w] = v
          queue.append(w)
    path = [last]
    while prev[path[-1]] is not None:
      path.append(prev[path[-1]])
    path = path[::-1] + [start]
    cycles.append(' -> '.join(f'{a} ({edges[a][b]})' for a, b in zip(path, path[1:]))
                  + f' -> {start}')
  return cycles


def test_import_graph_library_never_imports_the_checkout():
  edges, checkout_only, modules = _graph()
  assert 'plt_jax.kernels' in modules and 'plt_jax.presets' in modules, sorted(modules)
  checkout_only = list(dict.fromkeys(checkout_only))   # `from m import a, b` is one line
  assert not checkout_only, 'imports of checkout-only packages:\n' + '\n'.join(checkout_only)


def test_import_graph_has_no_cycle():
  edges, _, _ = _graph()
  cycles = _cycles(edges)
  assert not cycles, 'import cycles (importer (file:line) -> imported):\n' + '\n'.join(cycles)


# The layers, from the bottom. A module imports (at any depth, inside functions too) only from
# its own layer or below. The root package `plt_jax` itself is a facade over the core.
LAYERS = (
    ('kernels', ('plt_jax.kernels',)),
    ('core', ('plt_jax.config', 'plt_jax.model', 'plt_jax.attention', 'plt_jax.runtime',
              'plt_jax.sharding', 'plt_jax.fileio', 'plt_jax.tokenizer', 'plt_jax.loop_exit',
              'plt_jax._checkout')),
    ('data', ('plt_jax.data',)),
    ('train/infer/hf', ('plt_jax.train', 'plt_jax.infer', 'plt_jax.hf', 'plt_jax.presets')),
    ('evaluation', ('plt_jax.evaluation',)),
    ('study', ('plt_jax.study',)),
)


def _layer(module: str):
  """Index into LAYERS of the longest prefix that names `module` (None: unassigned)."""
  found = None
  for i, (_, prefixes) in enumerate(LAYERS):
    if any(module == p or module.startswith(p + '.') for p in prefixes):
      found = i
  return found


def _layer_violations(edges) -> list:
  bad = []
  for importer, deps in sorted(edges.items()):
    if importer == 'plt_jax':
      continue
    for imported, where in sorted(deps.items()):
      if imported == 'plt_jax':
        continue
      a, b = _layer(importer), _layer(imported)
      if a is None or b is None:
        bad.append(f'{where}: {importer if a is None else imported} is in no layer')
      elif b > a:
        bad.append(f'{where}: {importer} ({LAYERS[a][0]}) imports {imported} ({LAYERS[b][0]})')
  return bad


def test_import_graph_respects_the_layers():
  edges, _, _ = _graph()
  bad = _layer_violations(edges)
  assert not bad, 'imports against the layers:\n' + '\n'.join(bad)
  # The check sees what it looks for: an upward edge and a module in no layer.
  assert _layer_violations({'plt_jax.model': {'plt_jax.train.step': 'x:1'}}) == [
      'x:1: plt_jax.model (core) imports plt_jax.train.step (train/infer/hf)']
  assert _layer_violations({'plt_jax.extra': {'plt_jax.model': 'x:2'}}) == [
      'x:2: plt_jax.extra is in no layer']


# Imports inside functions are for optional heavy dependencies; everything else is imported at
# the top of its module, where a reader sees what a module depends on.
FUNCTION_IMPORTS_MAX = 30


def _function_imports() -> list:
  found = []
  for rel in _source_files():
    if not rel.endswith('.py'):
      continue
    with open(os.path.join(REPO, _repo_path(rel))) as f:
      tree = ast.parse(f.read())
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for node in ast.walk(fn):
          if isinstance(node, (ast.Import, ast.ImportFrom)):
            name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            found.append(f'{_repo_path(rel)}:{node.lineno}: {name}')
  return sorted(set(found))


def test_few_imports_inside_functions():
  found = _function_imports()
  assert len(found) < FUNCTION_IMPORTS_MAX, (
      f'{len(found)} imports inside functions (at most {FUNCTION_IMPORTS_MAX - 1}):\n'
      + '\n'.join(found))


def test_kernels_import_only_jax_numpy_stdlib_and_themselves():
  modules = _modules()
  allowed = set(sys.stdlib_module_names) | {'jax', 'jaxlib', 'numpy'}
  bad = []
  for name, (rel, is_pkg) in sorted(modules.items()):
    if not (name == 'plt_jax.kernels' or name.startswith('plt_jax.kernels.')):
      continue
    for target, _, line in _imports(name, rel, is_pkg, modules):
      inside = target == 'plt_jax.kernels' or target.startswith('plt_jax.kernels.')
      if not inside and target.split('.')[0] not in allowed:
        bad.append(f'{_repo_path(rel)}:{line}: {name} imports {target}')
  bad = list(dict.fromkeys(bad))   # `from m import a, b` is one line
  assert not bad, 'plt_jax.kernels reaches outside itself:\n' + '\n'.join(bad)


def test_import_graph_sees_lazy_and_relative_imports():
  # The graph must not miss the imports it is meant to catch: function-level ones resolve,
  # relative ones resolve against the package, and edges to a package go to its __init__.
  edges, _, _ = _graph()
  assert 'plt_jax.hf.convert' in edges['plt_jax.hf.importer']
  assert 'plt_jax.presets' in edges['plt_jax.hf.importer']     # inside import_as_workdir
  assert 'plt_jax.hf' not in edges['plt_jax.hf.importer']      # its own package
  assert 'plt_jax.hf.torch_src.configuration_plt' in edges['plt_jax.hf.torch_src.modeling_plt']
  assert 'plt_jax.presets' in edges['plt_jax']                 # the lazy attribute
