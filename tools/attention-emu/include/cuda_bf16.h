// Stands in for the CUDA header under the emulator: emu.h defines the bf16 types and conversions.
#pragma once
