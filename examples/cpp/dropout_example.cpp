// Applies regdrop's dropout to a tensor and prints the fraction it kept.
#include <ATen/ATen.h>
#include <regdrop/regdrop.h>

#include <iostream>

int main() {
  const double p = 0.1;
  const at::Tensor x = at::randn({1024, 1024});
  const auto [y, mask] = regdrop::dropout(x, p);
  const double kept = y.ne(0).to(at::kDouble).mean().item<double>();
  std::cout << "dropout(p=" << p << ") kept " << kept << " of " << x.numel()
            << " elements; mask: " << mask.numel() << " bytes\n";
}
