// Python bindings of misa_kernels._C: the CUDA kernels, present in CUDA builds only. Compiled
// without the CPU vector flags, so importing it is safe on any CPU (the CPU kernels are in
// misa_kernels._cpu_<capability>, see csrc/cpu/module.cpp).
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "misa-kernels compiled CUDA kernels (see misa_kernels.backends.cuda)";
#ifdef MISA_WITH_CUDA
  m.def("has_cuda", [] { return true; });
  m.def("cuda_grad_sq_norms", &misa::cuda::grad_sq_norms);
  m.def("cuda_adamw_step_", &misa::cuda::adamw_step_);
#else
  m.def("has_cuda", [] { return false; });
#endif
}
