"""Speaker encoders behind one interface (``base.SpeakerEncoder``): this pipeline's ECAPA-TDNN and
mixture of experts, the bundled CAM++ and GE2E, SpeechBrain directories and ONNX files
(``loader.load_encoder`` reads an encoder spec). Inference adapters only; training lives in
``voiceprint.training``."""
