"""The job runtime: the workspace on disk, recipe -> jobs (`pipeline`), the engine process that runs them
(`worker`), multi-process launches (`distributed`), what a stage gets (`context`), telemetry and failure hints.

May import: `engine.recipe` and `storage`. Never the parts that compute (data, fp4, training, evaluation, serving,
stages): the engine process stays light and a job's process is where the heavy libraries load.
"""
