//! CKE-style pure kernels and the decoder model laid out in one bump arena per stage.
