"""osslbench: a benchmark harness for open-set semi-supervised learning and knowledge distillation."""

__version__ = "0.1.0"
