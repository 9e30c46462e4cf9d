// Stands in for the CUDA header under the emulator: cuda_emu.h defines the bf16 types.
#pragma once
