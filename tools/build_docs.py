"""Build the documentation site from the notebooks of `nbs/`, offline: `python tools/build_docs.py [--out _docs]`.

The notebooks go through nbdev's own processors (the ones `nbdev_docs` uses: front matter, `show_doc` API docs
of every exported name, `#| hide`, links between symbols), then each becomes one static HTML page, `NN_name.ipynb`
-> `name.html` as nbdev names them. Quarto, which `nbdev_docs` renders with, cannot be installed from a package
registry (PyPI's `quarto-cli` downloads its binary from GitHub while it installs), so the pages are rendered here
with mistune and Pygments.

Nothing is executed but what the API docs need: exported cells, cells made only of imports, and `show_doc` calls.
Examples and tests never run here (nbdev itself would also run any cell that mixes an import with other code). The
outputs and plots a tutorial or run-notebook page shows are those `make test` captured: the tutorials as
`tools/run_tutorials.py` executed them, the run notebooks as the tests executed them with papermill, kept in
`_proc/executed/` (a copy is used only while its code cells equal the source's).

The index page is the README; the sidebar groups tutorials, run notebooks and API pages; `search.json` and a few
lines of JavaScript search titles, headings, documented names and text in the browser.
"""
import argparse, ast, base64, html, json, os, re, shutil, sys, tempfile, time, warnings
from pathlib import Path
from urllib.parse import urljoin

ROOT = Path(__file__).resolve().parent.parent
RUN_NOTEBOOKS = ('train', 'eval', 'sweep')  # papermill run notebooks: pages, never executed
EXECUTED = ROOT / '_proc' / 'executed'  # executed copies kept by `make test` (tutorials/NAME.ipynb, run-NAME.ipynb)


def executed_copy(src):
    "The executed copy of a tutorial or run notebook, when there is one whose code cells equal the source's"
    src = Path(src)
    if src.parent.name == 'tutorials': p = EXECUTED / 'tutorials' / src.name
    elif src.stem in RUN_NOTEBOOKS: p = EXECUTED / f'run-{src.name}'
    else: return None
    if not p.is_file(): return None
    code = lambda f: [''.join(c['source']) for c in json.loads(Path(f).read_text())['cells'] if c['cell_type'] == 'code']
    if code(p) != code(src):
        print(f'{src.name}: the executed copy {p} is out of date (its code differs); shown without outputs', flush=True)
        return None
    return p


def _split_title_cell(nb):
    "nbdev takes the first markdown cell as front matter and drops the rest of that cell, and keeps only the first `>` line: split it"
    from execnb.nbio import mk_cell
    if not nb.cells or nb.cells[0].cell_type != 'markdown': return
    lines = nb.cells[0].source.splitlines()
    if not lines or not re.match(r'#\s+\S', lines[0]): return
    i, desc = 1, []
    while i < len(lines) and not lines[i].strip(): i += 1
    while i < len(lines) and lines[i].startswith('>'): desc.append(lines[i][1:].strip()); i += 1
    nb.cells[0].source = lines[0] + ('\n\n> ' + ' '.join(desc) if desc else '')
    rest = '\n'.join(lines[i:]).strip()
    if rest: nb.cells.insert(1, mk_cell(rest, 'markdown'))


def _procs():
    "nbdev's `FilterDefaults`, with `exec_show_docs` replaced by one that runs only what the API docs need"
    from nbdev.processors import FilterDefaults, exec_show_docs, cell_lang

    def _api_cell(cell):
        if cell.cell_type != 'code' or cell_lang(cell) != 'python' or not cell.source: return False
        if cell.directives_.get('eval:', [''])[0].lower() == 'false': return False
        if cell.directives_.keys() & {'export', 'exports', 'exporti', 'exec_doc'}: return True
        trees = cell.parsed_()
        if not trees: return False
        if all(isinstance(t, (ast.Import, ast.ImportFrom)) for t in trees): return True
        return all(isinstance(t, ast.Expr) and isinstance(t.value, ast.Call)
                   and getattr(t.value.func, 'id', None) == 'show_doc' for t in trees)

    class exec_api_cells(exec_show_docs):
        def __call__(self, cell):
            if not self.nb.has_docs_ or not hasattr(self, 'k'): return
            if _api_cell(cell): self.k.cell(cell)
            if self.k.exc:
                raise RuntimeError(f"{Path(self.nb.path_).name}: cell {cell.idx_} failed while building its API docs:\n"
                                   f"{cell.source}") from self.k.exc

    class DocsFilter(FilterDefaults):
        def base_procs(self): return [exec_api_cells if p is exec_show_docs else p for p in super().base_procs()]
    return DocsFilter()


def _directives(src):
    "Quarto cell options (`#| key: value` at the top of a cell) and the source without them"
    opts, lines = {}, src.splitlines()
    while lines and (m := re.match(r'#\|\s*([\w-]+)\s*:?\s*(.*)$', lines[0])):
        opts[m.group(1)] = m.group(2).strip()
        lines.pop(0)
    return opts, '\n'.join(lines).strip()


def _machine_paths():
    "This machine's folders (the interpreter, the repository, the venv, the home folder) and what a page names them instead"
    subs = {repr(sys.executable): 'sys.executable', sys.executable: 'python', str(ROOT): '.', sys.prefix: '<venv>',
            sys.base_prefix: '<python>', str(Path.home()): '~'}
    pats = [(re.compile(re.escape(k) + r"(?![\w.-])"), v) for k, v in sorted(subs.items(), key=lambda kv: -len(kv[0]))
            if len(Path(k.strip("'")).parts) > 1]
    tmp = re.escape(tempfile.gettempdir())  # the scratch folders of the tests that executed a notebook
    return pats + [(re.compile(tmp + r"/pytest-of-[^/\s]+/pytest-\d+/[^/\s'\"]+"), '<tmp>'),
                   (re.compile(tmp + r"/[^/\s'\"]+"), '<tmp>')]


def _slug(text):
    "The id pandoc (so quarto and nbdev's links) gives a heading"
    s = re.sub(r'<[^>]+>', '', text).strip().lower()
    s = re.sub(r'[^\w\s.-]', '', s)
    s = re.sub(r'\s+', '-', s)
    return re.sub(r'^[^a-z_]+', '', s) or 'section'


class _Renderer:
    def __init__(self, site_url):
        import mistune
        from pygments.formatters import HtmlFormatter
        self.fmt, self.site_url = HtmlFormatter(), site_url.rstrip('/') + '/'
        self.scrub = _machine_paths()
        me = self

        class R(mistune.HTMLRenderer):
            def heading(self, text, level, **attrs):
                return f'<h{level} id="{_slug(text)}">{text}</h{level}>\n'
            def block_code(self, code, info=None):
                return me.code(code, (info or 'text').split()[0])
        self.md = mistune.create_markdown(renderer=R(escape=False), plugins=['table', 'strikethrough', 'url'])

    def code(self, src, lang='python'):
        from pygments import highlight
        from pygments.lexers import get_lexer_by_name, TextLexer
        try: lexer = get_lexer_by_name(lang)
        except Exception: lexer = TextLexer()
        return highlight(src, lexer, self.fmt)

    def markdown(self, src):
        src = re.sub(r'(\]\([^)\s]*\))\{[^}\n]*\}', r'\1', src)  # quarto link attributes: {target="_blank" ...}
        return self.md(src.replace(self.site_url, ''))  # nbdev's links into this site stay relative

    def output(self, o):
        "An output (the API docs `show_doc` made, or one saved in the notebook), without this machine's paths"
        def text(v):
            v = ''.join(v) if isinstance(v, list) else v
            for pat, rep in self.scrub: v = pat.sub(rep, v)
            return v
        data = o.get('data', {})
        if 'image/png' in data:
            png = ''.join(data['image/png']) if isinstance(data['image/png'], list) else data['image/png']
            return f'<section class="output"><img alt="figure" src="data:image/png;base64,{png.strip()}"></section>'
        if o.get('output_type') == 'stream': res = f'<pre>{html.escape(text(o.get("text", "")))}</pre>'
        elif 'text/markdown' in data: res = self.markdown(text(data['text/markdown']))
        elif 'text/plain' in data: res = f'<pre>{html.escape(text(data["text/plain"]))}</pre>'
        else: return ''
        return f'<section class="output">\n{res}</section>'

    def cells(self, nb):
        parts = []
        for c in nb.cells:
            src = c.source or ''
            if c.cell_type == 'markdown' and src.strip(): parts.append(self.markdown(src))
            elif c.cell_type == 'code':
                opts, code = _directives(src)
                if opts.get('echo', 'true').lower() != 'false' and code: parts.append(self.code(code))
                parts.extend(self.output(o) for o in c.get('outputs', []))
        return '\n'.join(p for p in parts if p)


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} – {site}</title>
<link rel="stylesheet" href="styles.css">
</head>
<body>
<nav class="sidebar">
<a class="site" href="index.html">{site}</a>
<input id="search" type="search" placeholder="Search the docs" aria-label="Search the docs">
<ul id="results"></ul>
{nav}
</nav>
<main>
<header><h1 class="title">{title}</h1>{desc}</header>
{body}
</main>
<script src="search_index.js"></script>
<script src="search.js"></script>
</body>
</html>
"""

_CSS = """body{margin:0;display:flex;font:16px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222}
.sidebar{flex:0 0 15rem;padding:1.2rem;border-right:1px solid #ddd;min-height:100vh;background:#fafafa;font-size:.93rem}
.sidebar .site{font-weight:700;font-size:1.2rem;text-decoration:none;color:#222}
.sidebar h2{font-size:.8rem;text-transform:uppercase;color:#777;margin:1.2rem 0 .3rem}
.sidebar ul{list-style:none;padding:0;margin:0}.sidebar li a{text-decoration:none;color:#2a5db0}
.sidebar li a.current{font-weight:700;color:#222}
main{flex:1;max-width:58rem;padding:1.2rem 2.5rem 4rem;min-width:0}
header .description{color:#555;font-size:1.1rem;margin-top:-.6rem}header .description p{margin:0 0 1rem}
a{color:#2a5db0}pre{overflow-x:auto;padding:.6rem .8rem;border-radius:4px;font-size:.88rem}
.highlight pre{background:#f6f8fa}.output>pre{background:#fff;border:1px solid #eee}
code{font-size:.9em}table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ddd;padding:.25rem .6rem}
h3{margin-top:1.6rem}hr{border:0;border-top:1px solid #e5e5e5;margin:2rem 0 .5rem}
#search{width:100%;box-sizing:border-box;margin:.8rem 0 .2rem;padding:.3rem .4rem}#results{margin-bottom:.5rem}
.output img,main img{max-width:100%}
"""

_SEARCH_JS = """// Client-side search over search_index.js (titles, headings, text of every page); no server, works from file://
const box = document.getElementById('search'), out = document.getElementById('results');
function score(e, q) {
  return (e.title.toLowerCase().includes(q) ? 10 : 0) + (e.names.some(n => n.toLowerCase().includes(q)) ? 5 : 0)
       + (e.text.toLowerCase().includes(q) ? 1 : 0);
}
box.addEventListener('input', () => {
  const q = box.value.trim().toLowerCase();
  out.replaceChildren();
  if (q.length < 2) return;
  const hits = SEARCH_INDEX.map(e => [e, score(e, q)]).filter(h => h[1] > 0).sort((a, b) => b[1] - a[1]).slice(0, 12);
  for (const [e] of hits) {
    const li = document.createElement('li'), a = document.createElement('a');
    a.href = e.page; a.textContent = e.title; li.appendChild(a); out.appendChild(li);
  }
  if (!hits.length) { const li = document.createElement('li'); li.textContent = 'no match'; out.appendChild(li); }
});
"""


def search_entry(q):
    "What the search knows of a page: title, its headings (documented names among them) and its text"
    names = [html.unescape(re.sub(r'<[^>]+>', '', h)).strip() for h in re.findall(r'<h[2-4][^>]*>(.*?)</h[2-4]>', q['body'], re.S)]
    text = html.unescape(re.sub(r'\s+', ' ', re.sub(r'<[^>]+>', ' ', re.sub(r'data:image/png;base64,[^"]+', '', q['body']))))
    return {'page': q['name'], 'title': q['title'], 'names': names, 'text': text[:30000]}


def readme_page(rnd, site_dir):
    "The README as the index page's body (its title line dropped: the page has one); its images copied beside"
    src = (ROOT / 'README.md').read_text()
    src = re.sub(r'\A# .*\n', '', src)
    def image(m):
        f = ROOT / m.group(2)
        if not f.is_file(): raise SystemExit(f'README.md shows {m.group(2)}, which does not exist')
        (site_dir / 'images').mkdir(exist_ok=True); shutil.copyfile(f, site_dir / 'images' / f.name)
        return f'![{m.group(1)}](images/{f.name})'
    return rnd.markdown(re.sub(r'!\[([^\]]*)\]\((?!https?:)([^)\s]+)\)', image, src))



def page_name(nb_path):
    "nbdev's page for a notebook (`54_train.ipynb` -> `train.html`); a run notebook's is `run-train.html`, as `train.html` is the module's"
    from nbdev.doclinks import _nbpath2html
    p = Path(nb_path)
    return f'run-{p.stem}.html' if p.stem in RUN_NOTEBOOKS else _nbpath2html(p).name


def build(out, quiet=False):
    out = Path(out).resolve()
    os.chdir(ROOT)
    os.environ['IN_TEST'] = '1'  # as nbdev sets it while processing notebooks
    from execnb.nbio import read_nb
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    cfg = get_config()
    site_url = urljoin(cfg.doc_host + '/', cfg.doc_baseurl.lstrip('/'))
    nbs = sorted(nbglob(cfg.nbs_path, as_path=True), key=lambda p: (p.stem != 'index', p.stem in RUN_NOTEBOOKS, p.name))
    if not nbs: raise SystemExit(f'no notebooks in {cfg.nbs_path}')
    procs, rnd = _procs(), _Renderer(site_url)
    pages = []
    for p in nbs:
        t0 = time.time()
        nb = read_nb(executed_copy(p) or p)
        _split_title_cell(nb)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            procs(nb)
        fm = getattr(nb, 'frontmatter_', {})  # title and description, from the first cell
        pages.append(dict(src=p, name=page_name(p), title=str(fm.get('title', p.stem)),
                          desc=str(fm.get('description', '')), body=rnd.cells(nb)))
        if not quiet: print(f'{p.name} -> {pages[-1]["name"]} ({time.time() - t0:.1f}s)', flush=True)

    seen = {}
    for q in pages:
        if q['name'] in seen: raise SystemExit(f"{seen[q['name']].name} and {q['src'].name} would both be {q['name']}")
        seen[q['name']] = q['src']

    def group(q):
        if q['src'].parent.name == 'tutorials': return 'Tutorials'
        return 'Run notebooks' if q['src'].stem in RUN_NOTEBOOKS else 'API'

    def nav(cur):
        groups = [(g, [q for q in pages if q['src'].stem != 'index' and group(q) == g])
                  for g in ('Tutorials', 'Run notebooks', 'API')]
        res = []
        for head, qs in groups:
            if not qs: continue
            res.append(f'<h2>{head}</h2>')
            res.append('<ul>' + ''.join(f'<li><a href="{q["name"]}"{" class=current" if q is cur else ""}>'
                                        f'{html.escape(q["title"])}</a></li>' for q in qs) + '</ul>')
        return '\n'.join(res)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix='.docs-', dir=out.parent))  # built beside, then swapped in whole
    try:
        from pygments.formatters import HtmlFormatter
        (tmp/'styles.css').write_text(_CSS + HtmlFormatter().get_style_defs('.highlight'))
        for q in pages:
            if q['src'].stem == 'index': q['body'] = readme_page(rnd, tmp)
        (tmp/'search.js').write_text(_SEARCH_JS)
        (tmp/'search_index.js').write_text('const SEARCH_INDEX = ' + json.dumps([search_entry(q) for q in pages]) + ';\n')
        for q in pages:
            desc = f'<div class="description">{rnd.markdown(q["desc"])}</div>' if q['desc'] else ''
            (tmp/q['name']).write_text(_PAGE.format(title=html.escape(q['title']), site=html.escape(cfg.title),
                                                    nav=nav(q), desc=desc, body=q['body']))
        tmp.chmod(0o755)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally: shutil.rmtree(tmp, ignore_errors=True)
    if not quiet: print(f'{len(pages)} pages in {out}')
    return out


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=None, help='output folder (default: doc_path of settings.ini, _docs)')
    ap.add_argument('--quiet', action='store_true')
    a = ap.parse_args()
    if a.out is None:
        os.chdir(ROOT)
        from nbdev.config import get_config
        a.out = get_config().doc_path
    build(a.out, a.quiet)
