"""Packaging for qllava, driven by settings.ini (the nbdev 2 layout)."""
from configparser import ConfigParser
from pathlib import Path
import shutil
import setuptools
from setuptools.command.build_py import build_py

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']
req = lambda key: cfg.get(key, '').split()

RUN_NOTEBOOKS = ('train.ipynb', 'eval.ipynb', 'sweep.ipynb')  # qllava.core.RUN_NOTEBOOKS: the notebooks users run


class BuildWithRunNotebooks(build_py):
    "Also ship nbs/{train,eval,sweep}.ipynb as qllava/notebooks/ (package_data takes only files under qllava/)."
    def run(self):
        super().run()
        out = Path(self.build_lib) / 'qllava' / 'notebooks'
        out.mkdir(parents=True, exist_ok=True)
        for name in RUN_NOTEBOOKS: shutil.copyfile(Path('nbs') / name, out / name)


setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], description=cfg['description'],
    long_description=Path('README.md').read_text(encoding='utf-8'), long_description_content_type='text/markdown',
    author=cfg['author'], author_email=cfg['author_email'], url=cfg['git_url'], license='Apache-2.0',
    keywords=cfg['keywords'], python_requires=f">={cfg['min_python']}",
    packages=setuptools.find_packages(include=['qllava', 'qllava.*']),
    include_package_data=True,
    package_data={'qllava': ['assets/**/*', 'assets/*']},
    install_requires=req('requirements'),
    extras_require={'train': req('train_requirements'), 'gpu': req('gpu_requirements'),
                    'serve': req('serve_requirements'), 'demo': req('demo_requirements'),
                    'dev': req('dev_requirements')},
    entry_points={'console_scripts': cfg['console_scripts'].split(), 'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    cmdclass={'build_py': BuildWithRunNotebooks},
    zip_safe=False,
)
