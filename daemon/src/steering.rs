//! CPU steering (`--steering cpu`): each shard thread is pinned to one CPU, and a classic BPF
//! program on the SO_REUSEPORT group hands every datagram to the socket of the shard pinned to the
//! CPU that received it, so a datagram is processed where its softirq ran and its cache lines are.
//!
//! Correct only where the CPU that receives a flow is stable: a NIC with RSS (or RPS) hashes a
//! flow's 4-tuple to one queue and one CPU. On loopback the receiving CPU is the sender's, which
//! moves with the scheduler, so a device's retransmission can reach another shard; see
//! docs/configuration.md.

use std::io;
use std::mem;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;

/// The CPUs this process may run on (its affinity mask), in ascending order.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain old data; sched_getaffinity fills it for the calling thread.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the size of the set.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: as above; CPU_SET is given a CPU below CPU_SETSIZE (checked).
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "CPU number too large",
        ));
    }
    unsafe { libc::CPU_SET(cpu, &mut set) };
    if unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The classic BPF program that picks the `i`th socket of a SO_REUSEPORT group for a datagram
/// received on `cpus[i]`. A datagram received on any other CPU gets an index past the group's
/// end, and the kernel falls back to its hash of the 4-tuple.
pub fn program(cpus: &[usize]) -> Vec<libc::sock_filter> {
    const LOAD_CPU: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JUMP_IF_EQUAL: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RETURN: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let statement = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let mut program = Vec::with_capacity(2 + 2 * cpus.len());
    program.push(statement(
        LOAD_CPU,
        (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32,
    ));
    for (index, &cpu) in cpus.iter().enumerate() {
        // Not this CPU: skip the return that follows.
        program.push(libc::sock_filter {
            code: JUMP_IF_EQUAL,
            jt: 0,
            jf: 1,
            k: cpu as u32,
        });
        program.push(statement(RETURN, index as u32));
    }
    program.push(statement(RETURN, u32::MAX));
    program
}

/// Attaches [`program`] for `cpus` to the SO_REUSEPORT group `socket` belongs to (the group is
/// shared: attaching through one member steers for all). Socket indices in the group follow bind
/// order, so shard `i`'s socket must have been bound `i`th.
pub fn steer_by_cpu(socket: &UdpSocket, cpus: &[usize]) -> io::Result<()> {
    let mut program = program(cpus);
    let filter = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `filter` points at `program`, alive for the call; the kernel copies it.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&filter as *const libc::sock_fprog).cast(),
            mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_maps_each_cpu_to_its_shard_and_others_to_the_hash() {
        let program = program(&[2, 5]);
        assert_eq!(program.len(), 6);
        // [ld cpu] [jeq 2] [ret 0] [jeq 5] [ret 1] [ret past-the-end]
        assert_eq!(program[1].k, 2);
        assert_eq!(program[2].k, 0);
        assert_eq!(program[3].k, 5);
        assert_eq!(program[4].k, 1);
        assert_eq!(program[5].k, u32::MAX);
        assert!(program.iter().all(|insn| insn.jt == 0 && insn.jf <= 1));
    }

    #[test]
    fn the_kernel_accepts_the_program_and_the_process_has_a_cpu() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
        let addr = "127.0.0.1:0".parse().unwrap();
        let (socket, _) = crate::io::bind(addr).unwrap();
        steer_by_cpu(&socket, &cpus).unwrap();
        pin_current_thread(cpus[0]).unwrap();
    }
}
