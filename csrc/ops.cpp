// The regdrop op library: its schemas (schemas.h), declared once.
#include "schemas.h"

TORCH_LIBRARY(regdrop, m) { regdrop::define_ops(m); }
