// CUDA runtime glue: device discovery and the allocator hooks. Plain C++ header so the
// rest of the engine can ask "is there a GPU" without including CUDA.
#pragma once

namespace mop::cuda {

// Number of usable CUDA devices; 0 when the driver or a device is missing.
int device_count();
// Installs cudaMalloc/cudaFree as the allocator of Device::cuda buffers.
void install_alloc_hooks();
// "NVIDIA H200 (sm_90, 139.8 GiB)"
const char* device_description();

}  // namespace mop::cuda
