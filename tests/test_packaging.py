"""The package's sources: the top-level kernels/ directory is the package plt_jax.kernels
(setup.py's package_dir; no symlink) and an editable install maps it there. The import graph of
the sources must not reach configs/ or experiments/, must have no cycle, must respect the layers,
and plt_jax.kernels must stand on its own. The wheel and the checkout in fresh processes are tested
in tests/integration/test_distribution.py.
"""
import ast
import collections
import json
import os
import sys

import pytest

from helpers import CHECKOUT_ONLY, PACKAGE_DIRS, REPO, package_source_files, repo_path

PKG = os.path.join(REPO, 'plt_jax')


def test_kernels_directory_is_a_mapped_package_not_a_link():
  for package, directory in PACKAGE_DIRS.items():
    assert not os.path.lexists(os.path.join(REPO, package)), f'{package} must not exist (a link?)'
    assert os.path.isfile(os.path.join(REPO, directory, '__init__.py')), directory
  links = [os.path.relpath(os.path.join(d, n), REPO) for top in ('plt_jax', 'kernels')
           for d, dirs, files in os.walk(os.path.join(REPO, top)) for n in dirs + files
           if os.path.islink(os.path.join(d, n))]
  assert not links, f'symlinks in the package sources: {links}'
  sources = package_source_files()
  assert 'plt_jax/kernels/ops.py' in sources and 'plt_jax/kernels/cpu/rows_matmul.cc' in sources
  assert repo_path('plt_jax/kernels/cpu/rows_matmul.cc') == 'kernels/cpu/rows_matmul.cc'
  assert repo_path('plt_jax/presets.py') == 'plt_jax/presets.py'


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
  for rel in package_source_files():
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
  with open(os.path.join(REPO, repo_path(rel))) as f:
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
      where = f'{repo_path(rel)}:{line}'
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
  for rel in package_source_files():
    if not rel.endswith('.py'):
      continue
    with open(os.path.join(REPO, repo_path(rel))) as f:
      tree = ast.parse(f.read())
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for node in ast.walk(fn):
          if isinstance(node, (ast.Import, ast.ImportFrom)):
            name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            found.append(f'{repo_path(rel)}:{node.lineno}: {name}')
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
        bad.append(f'{repo_path(rel)}:{line}: {name} imports {target}')
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
