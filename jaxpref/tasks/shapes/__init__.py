"""The built-in `shapes` task: a procedural visual preference task with a gold judge, the test bed
that proves the pipeline against the truth (docs/SHAPES.md).

  scenes.py     scenes, rendering, prompts, answer tiers, the gold judge's rules
  judge.py      the judge as a reward function, registered as "shapes"
  tokenizer.py  the shipped tokenizer, registered as "shapes"
  data.py       `jaxpref data shapes`: the datasets in TRL's schema
  tower.py      `jaxpref tower`: the vision tower pretrained on scenes
  reads.py      what a model reads off the image (short questions), per question type
  demo.py       `jaxpref demo`: the whole pipeline, stage by stage, and its report
  cli.py        mounts the commands above under `jaxpref`
  configs/      the trainers' YAML files; assets/: the tokenizer and the pretrained base model

It imports the library; the library never imports it (jaxpref.registry finds it by name).
"""

from jaxpref.data.tokenizer import TOKENIZERS
from jaxpref.rewards import register
from jaxpref.tasks.shapes.judge import shapes as _judge
from jaxpref.tasks.shapes.tokenizer import load_shapes_tokenizer

register("shapes", _judge)
TOKENIZERS.register("shapes", load_shapes_tokenizer)
