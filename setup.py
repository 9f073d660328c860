"""Packaging for abkd, driven by settings.ini (the nbdev 2 layout)."""
from configparser import ConfigParser
import setuptools, shlex

config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

expected = ('version description keywords author author_email license status min_python '
            'lib_name user copyright git_url').split()
missing = [o for o in expected if o not in cfg]
if missing: raise ValueError(f"settings.ini is missing the keys {missing}")

licenses = {'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License')}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable',
            '6 - Mature', '7 - Inactive']
py_versions = '3.10 3.11 3.12 3.13'.split()

lic = licenses[cfg['license'].lower()]
min_python = cfg['min_python']
requirements = shlex.split(cfg.get('requirements', ''))
dev_requirements = shlex.split(cfg.get('dev_requirements', ''))
# The experiment pipelines use these; they are optional for the loss core.
experiments = ['torchvision>=0.19', 'transformers>=4.45', 'datasets>=2.20', 'accelerate>=0.34',
               'tokenizers>=0.19', 'rouge-score>=0.1.2']
# abkd.integrations: TRL's distillation trainers (experimental import paths, removed in TRL 2) and PEFT adapters.
trl = ['trl>=1.16,<2']
transformers = ['transformers>=5.24,<6', 'accelerate>=1.15']     # ABKDTrainer relies on Trainer internals of 5.x
peft = ['peft>=0.13']

setuptools.setup(
    name=cfg['lib_name'],
    license=lic[0],
    classifiers=['Development Status :: ' + statuses[int(cfg['status'])],
                 'Intended Audience :: ' + cfg['audience'].title(),
                 'License :: ' + lic[1],
                 'Natural Language :: ' + cfg['language'].title()] +
                ['Programming Language :: Python :: ' + o for o in py_versions[py_versions.index(min_python):]],
    url=cfg['git_url'],
    packages=setuptools.find_packages(include=['abkd', 'abkd.*']),
    include_package_data=True,
    package_data={'abkd': ['data/*.json']},
    install_requires=requirements,
    extras_require={'experiments': experiments, 'transformers': transformers, 'trl': trl, 'peft': peft,
                    'dev': experiments + transformers + trl + peft + dev_requirements},
    python_requires='>=' + min_python,
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    zip_safe=False,
    entry_points={'console_scripts': cfg.get('console_scripts', '').split(),
                  'nbdev': [f'{cfg.get("lib_path")}={cfg.get("lib_path")}._modidx:d']},
    version=cfg['version'], description=cfg['description'], keywords=cfg['keywords'],
    author=cfg['author'], author_email=cfg['author_email'],
)
