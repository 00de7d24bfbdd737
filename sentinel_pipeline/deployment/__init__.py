"""Deployment: what makes a verified bundle runnable outside this project.

- :mod:`~sentinel_pipeline.deployment.onnx_export`: ``model.onnx`` in every bundle (or the recorded
  reason why a family could not export);
- :mod:`~sentinel_pipeline.deployment.onnx_model`: the ONNX Runtime model behind the same call as the
  torch model (``runtime: onnx`` of replay and the backtest);
- :mod:`~sentinel_pipeline.deployment.onnx_parity`: ONNX Runtime against PyTorch on validation rows,
  down to the decisions (verification's ``onnx_parity`` check).

The archive of a bundle (``model_final.zip``) is :mod:`sentinel_pipeline.package`.
"""
