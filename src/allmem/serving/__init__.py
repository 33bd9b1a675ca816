"""Serving AllMem models with external engines (vLLM).

``allmem.serving.vllm_plugin.register`` is the ``vllm.general_plugins`` entry point;
``allmem.serving.vllm_model.AllMemForCausalLM`` is the vLLM model class. Importing this
package imports neither vLLM nor torch.
"""
