//! The VHDX format engine (MS-VHDX).
