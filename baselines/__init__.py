"""Built-in methods, one per file; each file holds one ``osslbench.method.Method`` subclass.

Installed as ``osslbench.baselines``; discovered automatically by ``osslbench.registry``.
"""
