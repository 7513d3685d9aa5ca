"""`make docs`: the documentation site builds offline, with a page per notebook and the API docs of every module, and
no page names this machine's folders or holds anything key-shaped."""
import ast, html, json, os, re, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
RUN_NOTEBOOKS = {'train', 'eval', 'sweep'}
EXECUTED = ROOT/'_proc'/'executed'  # what make test kept of the tutorials and run notebooks it executed

# Runs the builder with every socket connection and name lookup beyond this machine refused and reported.
_OFFLINE = r'''
import runpy, socket, sys
def _local(host): return isinstance(host, str) and (host.startswith('127.') or host in ('localhost', '::1', ''))
def _guard(real):
    def f(self, address, *a, **k):
        if self.family != getattr(socket, 'AF_UNIX', None) and not _local(address[0]):
            print(f'NETWORK ATTEMPT: {address}', file=sys.stderr, flush=True)
            raise OSError(f'the docs build tried the network: {address}')
        return real(self, address, *a, **k)
    return f
socket.socket.connect, socket.socket.connect_ex = _guard(socket.socket.connect), _guard(socket.socket.connect_ex)
_gai = socket.getaddrinfo
def _getaddrinfo(host, *a, **k):
    if not _local(host if isinstance(host, str) else (host or b'').decode()):
        print(f'NETWORK ATTEMPT: lookup {host}', file=sys.stderr, flush=True)
        raise OSError(f'the docs build looked up {host}')
    return _gai(host, *a, **k)
socket.getaddrinfo = _getaddrinfo
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def _notebooks():
    "The notebooks nbdev documents (it skips names starting with `_` or `.`)"
    return sorted(p for p in NBS.rglob('*.ipynb') if not any(part.startswith(('_', '.')) for part in p.relative_to(NBS).parts))


def _page(nb):
    "`index.ipynb` -> `index.html`, `54_train.ipynb` -> `train.html`, the run notebook `train.ipynb` -> `run-train.html`"
    if nb.stem in RUN_NOTEBOOKS: return f'run-{nb.stem}.html'
    return re.sub(r'^\d+[a-zA-Z0-9]*_', '', nb.stem).lower() + '.html'


def _module(nb):
    "The module a library notebook exports to (`#| default_exp name`), or None"
    for c in json.loads(nb.read_text())['cells']:
        m = re.search(r'^#\|\s*default_exp\s+(\S+)', ''.join(c['source']), re.M)
        if m: return m.group(1)


def _documented_names(mod):
    "The public functions and classes a module exports: each gets a `show_doc` section"
    tree = ast.parse((ROOT/'qllava'/(mod.replace('.', '/') + '.py')).read_text())
    alls = [n for n in tree.body if isinstance(n, ast.Assign) and any(getattr(t, 'id', '') == '__all__' for t in n.targets)]
    exported = set(ast.literal_eval(alls[0].value)) if alls else set()
    return sorted(n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.name in exported and not n.name.startswith('_'))


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp('site')/'_docs'
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1',
           'TOKENIZERS_PARALLELISM': 'false'}
    r = subprocess.run([sys.executable, '-c', _OFFLINE, str(ROOT/'tools'/'build_docs.py'), '--out', str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (f'the docs build (`make docs`: tools/build_docs.py; `make setup` installs what it needs) '
                               f'failed with exit code {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}')
    assert 'NETWORK ATTEMPT' not in r.stderr, r.stderr
    return out, {p.name: p.read_text() for p in out.glob('*.html')}


def test_every_notebook_has_its_page_with_its_title(site):
    out, pages = site
    nbs = _notebooks()
    assert len(nbs) > 10
    assert len({_page(nb) for nb in nbs}) == len(nbs), 'two notebooks would share a page'
    for nb in nbs:
        assert _page(nb) in pages, f'{nb.name}: no {_page(nb)} in the site ({sorted(pages)})'
        title = re.match(r'#\s+(.+)', ''.join(json.loads(nb.read_text())['cells'][0]['source'])).group(1).strip()
        assert f'<h1 class="title">{html.escape(title, quote=False)}</h1>' in pages[_page(nb)], nb.name
    assert set(pages) == {_page(nb) for nb in nbs}, 'pages without a notebook'
    assert (out/'styles.css').exists()


def test_each_library_page_has_the_api_docs_of_its_module(site):
    _, pages = site
    mods = {nb: _module(nb) for nb in _notebooks()}
    assert sum(m is not None for m in mods.values()) >= 20
    for nb, mod in mods.items():
        if mod is None: continue
        names = _documented_names(mod)
        page = pages[_page(nb)]
        missing = [n for n in names if f'id="{n.lower()}"' not in page]
        assert not missing, f'{_page(nb)} has no API docs for {missing}'
    for page, name in [('setup.html', 'make_optimizer'), ('setup.html', 'param_groups'), ('model.html', 'QllavaConfig')]:
        assert re.search(rf'<h3 id="{name.lower()}">{name}</h3>\s*<div class="highlight"><pre>.*\b{name}\b',
                         pages[page], re.S), f'{page}: no signature for {name}'


def test_the_run_notebooks_render_and_are_not_executed(site):
    "The build executes no run notebook: a page shows outputs only where a test kept an executed copy."
    _, pages = site
    for stem in RUN_NOTEBOOKS:
        page = pages[f'run-{stem}.html']
        assert 'papermill' in page and '<div class="highlight">' in page
        if not (EXECUTED/f'run-{stem}.ipynb').is_file():
            assert 'class="output"' not in page, f'run-{stem}.html shows outputs that no test kept'


def test_index_is_the_readme_and_the_sidebar_groups_the_pages(site):
    out, pages = site
    index = pages['index.html']
    assert 'make run' in index and 'make test' in index and 'Installing with pip' in index
    img = re.search(r'<img [^>]*src="(images/[^"]+)"', index)
    assert img and (out/img.group(1)).is_file(), 'the README figure is not in the site'
    nav = re.search(r'<nav class="sidebar">(.*?)</nav>', pages['train.html'], re.S).group(1)
    heads = re.findall(r'<h2>(.*?)</h2>', nav)
    assert heads == ['Tutorials', 'Run notebooks', 'API'], heads
    tutorials = nav.split('<h2>Tutorials</h2>')[1].split('<h2>')[0]
    assert 'reproduce_llasa.html' in tutorials and 'train.html' not in tutorials


def test_links_between_pages_resolve(site):
    _, pages = site
    for name, page in pages.items():
        for href in re.findall(r'href="([^"#]*)[^"]*"', page):
            if href.startswith(('http://', 'https://', 'mailto:')) or not href: continue
            assert href in pages or href == 'styles.css', f'{name} links to {href}, which is not in the site'
        for src in re.findall(r'src="([^"]+)"', page):
            if not src.startswith('data:'): assert (site[0]/src).is_file(), f'{name} loads {src}, which is not in the site'
        assert 'qllava.github.io' not in page, f'{name} links into the published site instead of its own folder'


def test_no_machine_path_or_key_in_any_page(site):
    out, pages = site
    home = str(Path.home())
    machine = {str(ROOT), sys.prefix, str(out.parent), '/work/', '/root/'} | ({home} if len(Path(home).parts) > 1 else set())
    key = re.compile(r'\b(sk-[A-Za-z0-9_-]{20,}|hf_[A-Za-z0-9]{30,}|AKIA[A-Z0-9]{16})')
    for name, page in pages.items():
        text = html.unescape(re.sub(r'<[^>]+>', '', page))
        for s in machine: assert s not in text, f'{name} names this machine\'s folder {s!r}'
        assert not key.search(text), f'{name} holds something key-shaped: {key.search(text).group(0)[:8]}...'
        # outputs (the API docs show_doc made, anything saved in a notebook) name no temporary or home folder either
        for o in re.findall(r'<section class="output">(.*?)</section>', page, re.S):
            o = html.unescape(re.sub(r'<[^>]+>', '', o))
            assert not re.search(r'(?<![\w.])/(tmp|home|Users)/', o), f'{name}: an output names a machine path: {o[:300]}'


def test_the_site_in_a_browser_shows_the_readme_plots_and_finds_a_name(site):
    "Headless Chromium (Debian's, as for the web demo): the index, a tutorial's plot, and the search box."
    import shutil
    chromium = shutil.which('chromium') or '/usr/bin/chromium'
    pytest.importorskip('playwright', reason='playwright (the dev extra) is not installed')
    if not Path(chromium).exists(): pytest.skip(f'no Chromium at {chromium}: install Debian\'s chromium (.ci/run does)')
    if not (EXECUTED/'tutorials'/'reproduce_llasa.ipynb').is_file():
        pytest.skip('no executed tutorials in _proc/executed: make test runs tools/run_tutorials.py before pytest')
    from playwright.sync_api import sync_playwright
    out, _ = site
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=['--no-sandbox', '--disable-gpu'])
        page = browser.new_page()
        page.goto((out/'index.html').as_uri())
        body = page.inner_text('main')
        assert 'make run' in body and 'make test' in body
        assert page.eval_on_selector('main img', 'i => i.complete && i.naturalWidth > 0'), 'the README figure did not load'
        page.goto((out/'reproduce_llasa.html').as_uri())
        assert page.eval_on_selector_all('.output img', 'xs => xs.filter(i => i.naturalWidth > 0).length') >= 1
        page.fill('#search', 'register_modality')
        page.wait_for_selector('#results a')
        hits = page.eval_on_selector_all('#results a', 'xs => xs.map(a => a.getAttribute("href"))')
        assert 'modality.html' in hits, hits
        page.click('#results a[href="modality.html"]')
        assert page.locator('#register_modality').count() == 1
        browser.close()
