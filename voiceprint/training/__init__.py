"""Training of the speaker encoder (the ``model`` stage), one job per module.

``stage`` picks the recipe from ``model.init`` and writes the model; ``loop`` is the one training
loop every recipe runs; ``objectives`` says what a step optimises (AAM-softmax, or distillation
from the cached CAM++ teacher); ``data`` decodes the train split and draws batches; ``state``
snapshots a run for resuming. ``distill`` (teacher cache), ``teacher_centres``, ``augment``,
``aam``, ``weight_average`` and ``centring`` are the pieces those use.
"""
