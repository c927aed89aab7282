//! A 16550A UART (the PC's COM1: I/O base `0x3f8`, IRQ 4), behaving as QEMU's
//! `hw/char/serial.c` does for a guest that polls or uses interrupts without relying on the
//! FIFO's timing.
//!
//! # What it models
//!
//! - The registers at offsets 0..=7 from the base: RBR/THR, IER, IIR/FCR, LCR (with the
//!   divisor latch behind DLAB), MCR, LSR, MSR and SCR, with QEMU's reset values (9600 baud
//!   divisor `0x0c`, MCR = OUT2, MSR = DCD | DSR | CTS).
//! - Transmission is instantaneous: a THR write hands the byte to the output callback at once,
//!   so LSR's THRE and TEMT are always set. In loopback mode (MCR bit 4) the byte goes to the
//!   receive side instead, and MSR reads reflect MCR's outputs as on real hardware.
//! - Reception: bytes pushed by the host wait in a bounded queue ([`INPUT_QUEUE_LIMIT`]
//!   bytes; more are dropped and counted). LSR's DR is set while the queue is not empty; an
//!   RBR read takes the next byte (or repeats the last one read when the queue is empty, like
//!   the non-FIFO 16550).
//! - Interrupts, by QEMU's priority: receive data available (IER bit 0, DR set), then
//!   transmitter holding register empty (IER bit 1 and a pending THRE interrupt, which is set
//!   by a THR write, whose transmission completes at once, and by writing IER while THR is
//!   empty, and cleared by reading IIR when it is the reported source or by writing THR).
//!   [`Serial::irq_level`] is the level of the IRQ line. A THR write drops a raised line and
//!   raises it again within the access, which an edge-triggered interrupt controller sees as
//!   a new edge: [`Serial::take_irq_pulse`] reports it.
//!
//! # What it does not model
//!
//! - Baud rate, character timing, the FIFO trigger level and the character-timeout
//!   interrupt: with FIFOs enabled (FCR bit 0, reflected in IIR bits 6-7) the receive
//!   interrupt is raised as soon as one byte is available, which is earlier than hardware
//!   would, never later.
//! - FCR's FIFO resets do not discard queued host input: the queue stands for the line and
//!   the host side as well as the FIFO (QEMU's character backend also keeps what the FIFO
//!   could not take), so a byte sent by the host is never lost to a guest's UART setup.
//! - Line errors (overrun, parity, framing, break) and modem-status changes never happen, so
//!   the line-status and modem-status interrupts are never raised.

use std::collections::VecDeque;

/// Most bytes of host input the UART keeps queued; [`Serial::push_input`] drops the rest.
pub const INPUT_QUEUE_LIMIT: usize = 64 * 1024;

/// Base I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

const LCR_DLAB: u8 = 0x80;

const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IER_MASK: u8 = 0x0f;

const IIR_NO_INT: u8 = 0x01;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_FIFO_ENABLED: u8 = 0xc0;

const FCR_FE: u8 = 0x01;
/// FCR bits that stick (QEMU keeps FIFO enable, DMA mode and the trigger level).
const FCR_STICKY: u8 = 0xc9;

const MCR_LOOP: u8 = 0x10;
const MCR_OUT2: u8 = 0x08;
const MCR_MASK: u8 = 0x1f;

const LSR_DR: u8 = 0x01;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

const MSR_DCD: u8 = 0x80;
const MSR_DSR: u8 = 0x20;
const MSR_CTS: u8 = 0x10;

/// Fixed part of the saved state: divisor (2), rbr, ier, lcr, mcr, fcr, scr, flags (7),
/// dropped-input count (8), queue length (4).
const SAVE_FIXED_LEN: usize = 2 + 7 + 8 + 4;
const FLAG_THR_IPENDING: u8 = 0x01;

/// Why [`Serial::restore`] refused a saved state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SerialError {
    /// The state is shorter than its fixed part or than its queue length says.
    #[error("serial state truncated: {len} bytes, expected {expected}")]
    Truncated {
        /// Bytes given.
        len: usize,
        /// Bytes the layout needs.
        expected: usize,
    },
    /// The state is longer than its layout.
    #[error("serial state has {extra} trailing bytes")]
    TrailingBytes {
        /// Bytes beyond the layout.
        extra: usize,
    },
    /// A register or flag holds a value the device can never hold.
    #[error("serial state: invalid {field} value {value:#x}")]
    InvalidField {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

/// A 16550A UART; see the [module documentation](self).
pub struct Serial {
    out: Box<dyn FnMut(u8) + Send>,
    divisor: u16,
    rbr: u8,
    ier: u8,
    lcr: u8,
    mcr: u8,
    fcr: u8,
    scr: u8,
    thr_ipending: bool,
    input: VecDeque<u8>,
    input_dropped: u64,
    /// The IRQ line dropped during the current access while it was raised.
    pulse: bool,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("divisor", &self.divisor)
            .field("ier", &self.ier)
            .field("lcr", &self.lcr)
            .field("mcr", &self.mcr)
            .field("fcr", &self.fcr)
            .field("thr_ipending", &self.thr_ipending)
            .field("input_len", &self.input.len())
            .field("input_dropped", &self.input_dropped)
            .finish_non_exhaustive()
    }
}

impl Serial {
    /// Version of the layout [`Serial::save`] writes and [`Serial::restore`] reads.
    ///
    /// Layout, version 1 (integers little-endian):
    ///
    /// | offset | size | field |
    /// |---|---|---|
    /// | 0 | 2 | divisor latch |
    /// | 2 | 1 | RBR (last byte read) |
    /// | 3 | 1 | IER (bits 0-3) |
    /// | 4 | 1 | LCR |
    /// | 5 | 1 | MCR (bits 0-4) |
    /// | 6 | 1 | FCR (sticky bits `0xc9`) |
    /// | 7 | 1 | SCR |
    /// | 8 | 1 | flags: bit 0 = THR-empty interrupt pending |
    /// | 9 | 8 | host input bytes dropped so far |
    /// | 17 | 4 | `n`, queued input bytes (at most [`INPUT_QUEUE_LIMIT`]) |
    /// | 21 | `n` | queued input, oldest first |
    pub const STATE_VERSION: u32 = 1;

    /// A UART in its reset state whose transmitted bytes go to `out`.
    pub fn new(out: Box<dyn FnMut(u8) + Send>) -> Self {
        Serial {
            out,
            divisor: 0x0c,
            rbr: 0,
            ier: 0,
            lcr: 0,
            mcr: MCR_OUT2,
            fcr: 0,
            scr: 0,
            thr_ipending: false,
            input: VecDeque::new(),
            input_dropped: 0,
            pulse: false,
        }
    }

    fn lsr(&self) -> u8 {
        let mut lsr = LSR_THRE | LSR_TEMT;
        if !self.input.is_empty() {
            lsr |= LSR_DR;
        }
        lsr
    }

    /// The interrupt identification (bits 0-3 of IIR).
    fn interrupt_id(&self) -> u8 {
        if self.ier & IER_RDI != 0 && !self.input.is_empty() {
            IIR_RDI
        } else if self.ier & IER_THRI != 0 && self.thr_ipending {
            IIR_THRI
        } else {
            IIR_NO_INT
        }
    }

    fn iir(&self) -> u8 {
        let fifo = if self.fcr & FCR_FE != 0 {
            IIR_FIFO_ENABLED
        } else {
            0
        };
        self.interrupt_id() | fifo
    }

    /// Level of the UART's interrupt line (IRQ 4 for COM1).
    pub fn irq_level(&self) -> bool {
        self.interrupt_id() != IIR_NO_INT
    }

    /// Whether the interrupt line went low and high again inside the accesses since the last
    /// call (a THR write while the THR-empty interrupt was raised), which an edge-triggered
    /// interrupt controller must see as a new edge; clears the flag.
    pub fn take_irq_pulse(&mut self) -> bool {
        std::mem::take(&mut self.pulse)
    }

    /// Bytes of host input waiting for the guest.
    pub fn input_len(&self) -> usize {
        self.input.len()
    }

    /// Bytes of host input dropped because the queue was full.
    pub fn input_dropped(&self) -> u64 {
        self.input_dropped
    }

    fn receive(&mut self, byte: u8) {
        if self.input.len() < INPUT_QUEUE_LIMIT {
            self.input.push_back(byte);
        } else {
            self.input_dropped = self.input_dropped.saturating_add(1);
        }
    }

    /// Queue `bytes` from the host for the guest to read; bytes beyond
    /// [`INPUT_QUEUE_LIMIT`] queued are dropped and counted ([`Serial::input_dropped`]).
    pub fn push_input(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.receive(b);
        }
    }

    /// A guest read of the register at `offset` from the base (only the low 3 bits count).
    pub fn read(&mut self, offset: u8) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset & 7 {
            0 if dlab => self.divisor.to_le_bytes()[0],
            0 => {
                if let Some(b) = self.input.pop_front() {
                    self.rbr = b;
                }
                self.rbr
            }
            1 if dlab => self.divisor.to_le_bytes()[1],
            1 => self.ier,
            2 => {
                let iir = self.iir();
                if iir & 0x0f == IIR_THRI {
                    self.thr_ipending = false;
                }
                iir
            }
            3 => self.lcr,
            4 => self.mcr,
            5 => self.lsr(),
            6 => {
                if self.mcr & MCR_LOOP != 0 {
                    // In loopback the modem outputs drive the inputs: OUT2 -> DCD,
                    // OUT1 -> RI, RTS -> CTS, DTR -> DSR.
                    ((self.mcr & 0x0c) << 4) | ((self.mcr & 0x02) << 3) | ((self.mcr & 0x01) << 5)
                } else {
                    MSR_DCD | MSR_DSR | MSR_CTS
                }
            }
            _ => self.scr,
        }
    }

    /// A guest write of `value` to the register at `offset` from the base (only the low 3
    /// bits count).
    pub fn write(&mut self, offset: u8, value: u8) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset & 7 {
            0 if dlab => self.divisor = (self.divisor & 0xff00) | u16::from(value),
            0 => {
                if self.irq_level() {
                    // Writing THR clears the THR-empty interrupt; if that lowers the line,
                    // the transmission completing below raises it again.
                    self.thr_ipending = false;
                    if !self.irq_level() {
                        self.pulse = true;
                    }
                }
                if self.mcr & MCR_LOOP != 0 {
                    self.receive(value);
                } else {
                    (self.out)(value);
                }
                // Transmission is instantaneous: THR is empty again.
                self.thr_ipending = true;
            }
            1 if dlab => self.divisor = (self.divisor & 0x00ff) | (u16::from(value) << 8),
            1 => {
                self.ier = value & IER_MASK;
                // THR is always empty, so enabling (or rewriting) IER arms the interrupt.
                self.thr_ipending = true;
            }
            2 => self.fcr = value & FCR_STICKY,
            3 => self.lcr = value,
            4 => self.mcr = value & MCR_MASK,
            5 | 6 => {}
            _ => self.scr = value,
        }
    }

    /// All register state and the queued input, in the layout of [`Serial::STATE_VERSION`].
    pub fn save(&self) -> Vec<u8> {
        let n = self.input.len();
        let mut v = Vec::with_capacity(SAVE_FIXED_LEN + n);
        v.extend_from_slice(&self.divisor.to_le_bytes());
        v.extend_from_slice(&[self.rbr, self.ier, self.lcr, self.mcr, self.fcr, self.scr]);
        v.push(if self.thr_ipending {
            FLAG_THR_IPENDING
        } else {
            0
        });
        v.extend_from_slice(&self.input_dropped.to_le_bytes());
        // n <= INPUT_QUEUE_LIMIT, which fits in u32.
        v.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
        let (a, b) = self.input.as_slices();
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        v
    }

    /// Replace the whole state by one [`Serial::save`] produced (same
    /// [`Serial::STATE_VERSION`]). Checks the exact length and every field; on error the
    /// UART is unchanged. The output callback is kept.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), SerialError> {
        let fixed = bytes.get(..SAVE_FIXED_LEN).ok_or(SerialError::Truncated {
            len: bytes.len(),
            expected: SAVE_FIXED_LEN,
        })?;
        let divisor = u16::from_le_bytes([fixed[0], fixed[1]]);
        let [rbr, ier, lcr, mcr, fcr, scr, flags] = [
            fixed[2], fixed[3], fixed[4], fixed[5], fixed[6], fixed[7], fixed[8],
        ];
        let mut dropped = [0u8; 8];
        dropped.copy_from_slice(&fixed[9..17]);
        let input_dropped = u64::from_le_bytes(dropped);
        let n = u32::from_le_bytes([fixed[17], fixed[18], fixed[19], fixed[20]]);
        let invalid = |field, value: u8| SerialError::InvalidField {
            field,
            value: u64::from(value),
        };
        if ier & !IER_MASK != 0 {
            return Err(invalid("IER", ier));
        }
        if mcr & !MCR_MASK != 0 {
            return Err(invalid("MCR", mcr));
        }
        if fcr & !FCR_STICKY != 0 {
            return Err(invalid("FCR", fcr));
        }
        if flags & !FLAG_THR_IPENDING != 0 {
            return Err(invalid("flags", flags));
        }
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n > INPUT_QUEUE_LIMIT {
            return Err(SerialError::InvalidField {
                field: "input queue length",
                value: u64::try_from(n).unwrap_or(u64::MAX),
            });
        }
        let expected = SAVE_FIXED_LEN + n;
        let queued = bytes
            .get(SAVE_FIXED_LEN..expected)
            .ok_or(SerialError::Truncated {
                len: bytes.len(),
                expected,
            })?;
        if bytes.len() > expected {
            return Err(SerialError::TrailingBytes {
                extra: bytes.len() - expected,
            });
        }
        self.divisor = divisor;
        self.rbr = rbr;
        self.ier = ier;
        self.lcr = lcr;
        self.mcr = mcr;
        self.fcr = fcr;
        self.scr = scr;
        self.thr_ipending = flags & FLAG_THR_IPENDING != 0;
        self.input_dropped = input_dropped;
        self.input = queued.iter().copied().collect();
        self.pulse = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn serial() -> (Serial, Arc<Mutex<Vec<u8>>>) {
        let out = Arc::new(Mutex::new(Vec::new()));
        let o = Arc::clone(&out);
        let s = Serial::new(Box::new(move |b| o.lock().unwrap().push(b)));
        (s, out)
    }

    #[test]
    fn reset_values() {
        let (mut s, _) = serial();
        assert_eq!(s.read(1), 0, "IER");
        assert_eq!(s.read(2), 0x01, "IIR: no interrupt");
        assert_eq!(s.read(3), 0, "LCR");
        assert_eq!(s.read(4), MCR_OUT2, "MCR");
        assert_eq!(s.read(5), 0x60, "LSR: THRE|TEMT");
        assert_eq!(s.read(6), 0xb0, "MSR: DCD|DSR|CTS");
        assert_eq!(s.read(7), 0, "SCR");
        assert!(!s.irq_level());
    }

    #[test]
    fn transmit_goes_to_out_and_lsr_stays_empty() {
        let (mut s, out) = serial();
        for &b in b"hi\n" {
            s.write(0, b);
            assert_eq!(s.read(5) & 0x60, 0x60);
        }
        assert_eq!(*out.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn divisor_latch_behind_dlab() {
        let (mut s, out) = serial();
        s.write(3, 0x83); // DLAB, 8N1
        s.write(0, 0x01);
        s.write(1, 0x00);
        assert_eq!(s.read(0), 0x01);
        assert_eq!(s.read(1), 0x00);
        s.write(3, 0x03);
        assert_eq!(s.read(3), 0x03);
        assert_eq!(s.read(1), 0, "IER untouched by divisor writes");
        assert!(
            out.lock().unwrap().is_empty(),
            "divisor writes transmit nothing"
        );
        s.write(3, 0x80);
        assert_eq!(s.read(0), 0x01);
        assert_eq!(s.divisor, 0x0001);
    }

    #[test]
    fn receive_sets_dr_and_reads_in_order() {
        let (mut s, _) = serial();
        assert_eq!(s.read(5) & LSR_DR, 0);
        s.push_input(b"ab");
        assert_eq!(s.read(5) & LSR_DR, LSR_DR);
        assert_eq!(s.read(0), b'a');
        assert_eq!(s.read(5) & LSR_DR, LSR_DR);
        assert_eq!(s.read(0), b'b');
        assert_eq!(s.read(5) & LSR_DR, 0);
        assert_eq!(s.read(0), b'b', "empty queue repeats the last byte read");
    }

    #[test]
    fn input_queue_is_bounded_and_counts_drops() {
        let (mut s, _) = serial();
        s.push_input(&vec![7u8; INPUT_QUEUE_LIMIT + 10]);
        assert_eq!(s.input_len(), INPUT_QUEUE_LIMIT);
        assert_eq!(s.input_dropped(), 10);
        s.read(0);
        s.push_input(b"xy");
        assert_eq!(s.input_len(), INPUT_QUEUE_LIMIT);
        assert_eq!(s.input_dropped(), 11);
    }

    #[test]
    fn receive_interrupt() {
        let (mut s, _) = serial();
        s.push_input(b"x");
        assert!(!s.irq_level(), "IER clear: no interrupt");
        s.write(1, IER_RDI);
        assert!(s.irq_level());
        assert_eq!(s.read(2), IIR_RDI);
        assert!(
            s.irq_level(),
            "reading IIR does not clear a receive interrupt"
        );
        assert_eq!(s.read(0), b'x');
        assert!(!s.irq_level());
        assert_eq!(s.read(2), IIR_NO_INT);
    }

    #[test]
    fn thr_empty_interrupt_lifecycle() {
        let (mut s, _) = serial();
        s.write(0, b'a');
        assert!(!s.irq_level(), "THRI masked");
        s.write(1, IER_THRI);
        assert!(s.irq_level(), "enabling THRI with THR empty raises it");
        assert_eq!(s.read(2), IIR_THRI);
        assert!(!s.irq_level(), "reading IIR reporting THRI clears it");
        assert_eq!(s.read(2), IIR_NO_INT);
        assert!(!s.take_irq_pulse());
        s.write(0, b'b');
        assert!(s.irq_level(), "transmission complete: THR empty again");
        assert!(
            !s.take_irq_pulse(),
            "line was low before the write: a plain rising edge"
        );
        s.write(0, b'c');
        assert!(s.irq_level());
        assert!(s.take_irq_pulse(), "write while raised: low then high");
        assert!(!s.take_irq_pulse(), "flag cleared by take");
    }

    #[test]
    fn receive_has_priority_over_thr_empty_and_iir_read_keeps_thri() {
        let (mut s, _) = serial();
        s.write(1, IER_RDI | IER_THRI);
        s.push_input(b"z");
        assert_eq!(s.read(2), IIR_RDI);
        assert!(s.thr_ipending, "THRI not reported, so not cleared");
        assert_eq!(s.read(0), b'z');
        assert_eq!(s.read(2), IIR_THRI);
        assert_eq!(s.read(2), IIR_NO_INT);
    }

    #[test]
    fn rx_interrupt_while_raised_thr_write_does_not_pulse() {
        let (mut s, _) = serial();
        s.write(1, IER_RDI | IER_THRI);
        s.push_input(b"q");
        s.write(0, b'w');
        assert!(s.irq_level());
        assert!(!s.take_irq_pulse(), "receive interrupt kept the line high");
    }

    #[test]
    fn fifo_bits_in_iir() {
        let (mut s, _) = serial();
        s.write(2, 0xc7); // enable + reset both + trigger 14
        assert_eq!(s.read(2), 0xc1);
        assert_eq!(s.fcr, 0xc1);
        s.push_input(b"k");
        s.write(2, 0x07);
        assert_eq!(s.input_len(), 1, "FIFO reset keeps host input");
        s.write(1, IER_RDI);
        assert_eq!(s.read(2), 0xc4);
        s.write(2, 0x00);
        assert_eq!(s.read(2), 0x04);
    }

    #[test]
    fn loopback() {
        let (mut s, out) = serial();
        s.write(4, MCR_LOOP | 0x0f);
        assert_eq!(s.read(6), 0xf0, "all outputs looped to DCD|RI|DSR|CTS");
        s.write(4, MCR_LOOP | 0x01);
        assert_eq!(s.read(6), MSR_DSR);
        s.write(4, MCR_LOOP | 0x02);
        assert_eq!(s.read(6), MSR_CTS);
        s.write(0, 0x5a);
        assert!(out.lock().unwrap().is_empty(), "loopback does not transmit");
        assert_eq!(s.read(5) & LSR_DR, LSR_DR);
        assert_eq!(s.read(0), 0x5a);
        s.write(4, 0x0b);
        assert_eq!(s.read(4), 0x0b);
        assert_eq!(s.read(6), 0xb0);
    }

    #[test]
    fn scratch_and_read_only_registers() {
        let (mut s, _) = serial();
        s.write(7, 0xa5);
        assert_eq!(s.read(7), 0xa5);
        s.write(5, 0x00);
        s.write(6, 0x00);
        assert_eq!(s.read(5), 0x60);
        assert_eq!(s.read(6), 0xb0);
        s.write(1, 0xff);
        assert_eq!(s.read(1), 0x0f, "IER keeps 4 bits");
        s.write(4, 0xff);
        assert_eq!(s.read(4), 0x1f, "MCR keeps 5 bits");
        assert_eq!(s.read(15), 0xa5, "offset taken modulo 8");
    }

    #[test]
    fn save_restore_round_trip() {
        let (mut s, _) = serial();
        s.write(3, 0x80);
        s.write(0, 0x03);
        s.write(1, 0x02);
        s.write(3, 0x1b);
        s.write(1, 0x03);
        s.write(2, 0x41);
        s.write(4, 0x0b);
        s.write(7, 0x42);
        s.push_input(b"hello");
        s.read(0);
        let saved = s.save();
        assert_eq!(saved.len(), SAVE_FIXED_LEN + 4);

        let (mut t, out) = serial();
        t.restore(&saved).unwrap();
        assert_eq!(t.save(), saved);
        assert_eq!(t.read(1), 0x03);
        assert_eq!(t.read(3), 0x1b);
        assert_eq!(t.read(4), 0x0b);
        assert_eq!(t.read(7), 0x42);
        assert!(t.irq_level());
        assert_eq!(t.read(2), 0xc4, "FIFO on, receive data available");
        assert_eq!(t.read(0), b'e');
        t.write(3, 0x80);
        assert_eq!(t.read(0), 0x03);
        assert_eq!(t.read(1), 0x02);
        t.write(3, 0x03);
        t.write(0, b'!');
        assert_eq!(*out.lock().unwrap(), b"!");
    }

    #[test]
    fn restore_is_strict_and_atomic() {
        let (mut s, _) = serial();
        s.push_input(b"abc");
        let good = s.save();
        let (mut t, _) = serial();
        t.write(7, 0x99);
        let before = t.save();
        for len in 0..good.len() {
            assert!(
                matches!(t.restore(&good[..len]), Err(SerialError::Truncated { .. })),
                "len {len}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(
            t.restore(&long),
            Err(SerialError::TrailingBytes { extra: 1 })
        );
        for (at, v, field) in [
            (3, 0x10, "IER"),
            (5, 0x20, "MCR"),
            (6, 0x02, "FCR"),
            (8, 0x02, "flags"),
        ] {
            let mut bad = good.clone();
            bad[at] = v;
            assert!(
                matches!(t.restore(&bad), Err(SerialError::InvalidField { field: f, .. }) if f == field)
            );
        }
        let mut huge = good.clone();
        huge[17..21].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            t.restore(&huge),
            Err(SerialError::InvalidField { .. })
        ));
        assert_eq!(t.save(), before, "failed restores change nothing");
    }

    proptest::proptest! {
        #[test]
        fn restore_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let (mut s, _) = serial();
            if s.restore(&bytes).is_ok() {
                proptest::prop_assert_eq!(s.save(), bytes);
            }
        }

        #[test]
        fn register_accesses_never_panic(ops in proptest::collection::vec((0u8..16, proptest::num::u8::ANY, proptest::bool::ANY), 0..200)) {
            let (mut s, _) = serial();
            for (off, v, w) in ops {
                if w { s.write(off, v) } else { s.read(off); }
                proptest::prop_assert_eq!(s.read(5) & 0x60, 0x60);
            }
            let saved = s.save();
            let (mut t, _) = serial();
            t.restore(&saved).unwrap();
            proptest::prop_assert_eq!(t.save(), saved);
        }
    }
}
