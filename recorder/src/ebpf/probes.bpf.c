// SPDX-License-Identifier: MIT OR Apache-2.0 OR GPL-2.0
// slug's eBPF endpoint probes: off-CPU intervals (why and who woke), syscall latency (exact
// records above a threshold, log2 histograms below), user page faults with their address, task
// migrations, and TCP retransmits and drops on the sockets they use, for the stage threads of one
// process (`target_tgid`; user space registers each stage thread in `thread_stage`, so the
// recorder's own threads cost nothing here), sent to user space through one ring buffer.
// Timestamps are bpf_ktime_get_ns(), i.e. CLOCK_MONOTONIC.
//
// Built by recorder/tests/ebpf_bootstrap.rs:
//   clang -target bpf -O2 -g -c probes.bpf.c -o probes.bpf.o && llvm-strip -g probes.bpf.o
// Kernel structs are declared with only the fields read; CO-RE relocations (against
// /sys/kernel/btf/vmlinux, applied by aya at load) find their real offsets.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "Dual MIT/GPL";

struct thread_info {
	unsigned int cpu;
} __attribute__((preserve_access_index));

// `cpu` moved from thread_info into task_struct in some configurations: either is read.
struct task_struct {
	struct thread_info thread_info;
	unsigned int cpu;
	int pid;
	int tgid;
} __attribute__((preserve_access_index));

struct sock_common {
	unsigned short skc_dport; // network byte order
	unsigned short skc_num;   // host byte order
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));

struct sk_buff {
	struct sock *sk;
} __attribute__((preserve_access_index));

struct pt_regs {
	unsigned long ip;
} __attribute__((preserve_access_index));

// Record kinds; the same numbers as slug_schema::EbpfKind.
#define KIND_SYSCALL 0
#define KIND_OFF_CPU 1
#define KIND_PAGE_FAULT 2
#define KIND_MIGRATION 3
#define KIND_TCP_RETRANSMIT 5
#define KIND_TCP_DROP 6

// One ring-buffer record (recorder/src/ebpf/record.rs has the same layout).
struct record {
	__u64 ns;
	__u64 arg0;
	__u64 arg1;
	__u64 arg2;
	__u32 kind;
	__u32 tid;
	__u32 cpu;
	__u32 pad;
};

// Set by the loader before load.
volatile const __u32 target_tgid = 0;
volatile const __u64 slow_syscall_ns = 1000000;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} events SEC(".maps");

// Records that did not fit in the ring (index 0), histogram counts that found the map full
// (index 1), per-step histogram counts whose step slot was not theirs any more (index 2: user
// space had not re-armed it yet, or was reading it back) and the number of counts made in
// `syscall_hist` so far (index 3: user space reads that map only when this changed).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

// Per-thread state lives in arrays indexed by the tid's low bits (a hash map update on every
// syscall cost several times more). A slot remembers whose it is: a thread whose slot another
// thread of the process took over (tids 65536 apart) just loses that record.
#define THREAD_SLOTS 65536
#define SLOT(tid) ((tid) & (THREAD_SLOTS - 1))

// Thread slot -> the stage thread it is (registered by user space when the thread first records
// an event). Only registered threads are probed: the recorder's own threads (writers, encoders,
// the reader of this ring) are not the stage's, and probing them would make work for nothing.
#define NO_STAGE 0xffffffff // a stage thread whose syscalls are not counted per step

struct thread_stage {
	__u32 tid; // 0: free
	__u32 stage;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, THREAD_SLOTS);
	__type(key, __u32);
	__type(value, struct thread_stage);
} thread_stage SEC(".maps");

struct syscall_start {
	__u64 ns;
	__u32 nr;
	__u32 tid; // 0: free
};

// Thread slot -> the syscall it is in.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, THREAD_SLOTS);
	__type(key, __u32);
	__type(value, struct syscall_start);
} in_syscall SEC(".maps");

struct off_cpu {
	__u64 ns;
	__u64 reason; // bits 0-31: prev_state (0 = preempted, still runnable); 32-63: syscall nr + 1
	__u32 waker;  // tid of the thread that woke it, 0 if none seen
	__u32 tid;    // 0: free
};

// Thread slot -> when and why it left the CPU.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, THREAD_SLOTS);
	__type(key, __u32);
	__type(value, struct off_cpu);
} switched_out SEC(".maps");

struct hist_key {
	__u32 tid;
	__u16 nr;
	__u16 bucket; // floor(log2(duration ns))
};

// Syscall latency histogram, cumulative counts (user space takes differences).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768);
	__type(key, struct hist_key);
	__type(value, __u64);
} syscall_hist SEC(".maps");

// Per-step histograms. User space registers, once per stage, the address of the stage's
// "current step" u64 in this process's memory (stage_step) and, once per thread, the thread's
// stage (thread_stage); the probe reads the step with bpf_probe_read_user (the tgid filter
// guarantees the address is ours) and counts into the step's slot of step_hist. User space maps
// step_hist into its memory and reads completed steps there, without a syscall.
#define STAGES 8
#define STEP_SLOTS 64
#define STEP_CLASSES 8 // class 0: not counted per step (the syscall_hist window histogram)
#define STEP_BUCKETS 32
#define SYSCALL_NRS 512

// Stage -> address of its current step (0: not registered).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, STAGES);
	__type(key, __u32);
	__type(value, __u64);
} stage_step SEC(".maps");

// Syscall nr -> class counted per step (0: none), filled by user space.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SYSCALL_NRS);
	__type(key, __u32);
	__type(value, __u32);
} syscall_class SEC(".maps");

// One step of one stage: the step it is armed for, the probes counting into it right now, then
// counts per class and log2 bucket. To read a step back, user space first sets `step` to
// STEP_CLOSED, then waits until `busy` is 0: a probe that saw the old step has finished adding,
// and one that comes later sees the slot closed and counts itself lost (index 2), so no count
// vanishes unseen. (The busy increment is a locked add, a full barrier on x86-64, the one
// architecture whose syscalls are counted per step.)
#define STEP_CLOSED 0xffffffffffffffffULL

struct step_hist {
	__u64 step;
	__u32 busy;
	__u32 pad;
	__u32 counts[STEP_CLASSES * STEP_BUCKETS];
};

// stage * STEP_SLOTS + step % STEP_SLOTS -> that step's histogram; user space mmaps it.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, STAGES * STEP_SLOTS);
	__type(key, __u32);
	__type(value, struct step_hist);
} step_hist SEC(".maps");

// Socket -> tid of the stage thread that last sent or received on it (retransmits and drops
// happen in softirq context, where the current task says nothing about whose socket it is).
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
} stage_sockets SEC(".maps");

#define HIST_GENERATION 3 // in `lost`, though it counts no loss

static __always_inline void count_lost(__u32 index)
{
	__u64 *n = bpf_map_lookup_elem(&lost, &index);
	if (n)
		__sync_fetch_and_add(n, 1);
}

static __always_inline void emit(__u32 kind, __u32 tid, __u64 ns, __u64 a0, __u64 a1, __u64 a2)
{
	struct record *r = bpf_ringbuf_reserve(&events, sizeof(*r), 0);
	if (!r) {
		count_lost(0);
		return;
	}
	r->ns = ns;
	r->arg0 = a0;
	r->arg1 = a1;
	r->arg2 = a2;
	r->kind = kind;
	r->tid = tid;
	r->cpu = bpf_get_smp_processor_id();
	r->pad = 0;
	bpf_ringbuf_submit(r, 0);
}

// The registration of stage thread `tid` of the target process, or 0.
static __always_inline struct thread_stage *stage_thread(__u32 tid)
{
	__u32 slot = SLOT(tid);
	struct thread_stage *ts = bpf_map_lookup_elem(&thread_stage, &slot);
	return ts && ts->tid == tid ? ts : 0;
}

static __always_inline struct thread_stage *current_stage_thread(__u32 *tid)
{
	__u64 id = bpf_get_current_pid_tgid();
	*tid = (__u32)id;
	if ((__u32)(id >> 32) != target_tgid)
		return 0;
	return stage_thread(*tid);
}

static __always_inline int task_is_stage_thread(struct task_struct *t, __u32 *tid)
{
	if ((__u32)BPF_CORE_READ(t, tgid) != target_tgid)
		return 0;
	*tid = BPF_CORE_READ(t, pid);
	return stage_thread(*tid) != 0;
}

static __always_inline __u16 log2_u64(__u64 v)
{
	__u16 r = 0;
	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) { r += 1; }
	return r;
}

// sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
//              unsigned int prev_state)
SEC("raw_tracepoint/sched_switch")
int slug_sched_switch(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *prev = (struct task_struct *)ctx->args[1];
	struct task_struct *next = (struct task_struct *)ctx->args[2];
	__u64 now = bpf_ktime_get_ns();
	__u32 tid;
	if (task_is_stage_thread(prev, &tid)) {
		__u32 slot = SLOT(tid);
		struct off_cpu *out = bpf_map_lookup_elem(&switched_out, &slot);
		if (out) {
			__u64 reason = ctx->args[0] ? 0 : (__u32)ctx->args[3];
			struct syscall_start *sc = bpf_map_lookup_elem(&in_syscall, &slot);
			if (sc && sc->tid == tid)
				reason |= ((__u64)sc->nr + 1) << 32;
			out->ns = now;
			out->reason = reason;
			out->waker = 0;
			out->tid = tid;
		}
	}
	// Only stage threads got a switched_out entry.
	if ((__u32)BPF_CORE_READ(next, tgid) == target_tgid) {
		tid = BPF_CORE_READ(next, pid);
		__u32 slot = SLOT(tid);
		struct off_cpu *out = bpf_map_lookup_elem(&switched_out, &slot);
		if (out && out->tid == tid) {
			emit(KIND_OFF_CPU, tid, out->ns, now - out->ns, out->reason, out->waker);
			out->tid = 0;
		}
	}
	return 0;
}

// sched_waking(struct task_struct *p), in the waker's context.
SEC("raw_tracepoint/sched_waking")
int slug_sched_waking(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *p = (struct task_struct *)ctx->args[0];
	if ((__u32)BPF_CORE_READ(p, tgid) != target_tgid)
		return 0;
	__u32 tid = BPF_CORE_READ(p, pid);
	__u32 slot = SLOT(tid);
	struct off_cpu *out = bpf_map_lookup_elem(&switched_out, &slot);
	if (out && out->tid == tid && !out->waker)
		out->waker = (__u32)bpf_get_current_pid_tgid();
	return 0;
}

// Counts a syscall of stage thread `ts` in its stage's current step; 0 when the syscall or the
// thread is not counted per step.
static __always_inline int count_in_step(struct thread_stage *ts, __u64 nr, __u16 bucket)
{
	if (nr >= SYSCALL_NRS)
		return 0;
	__u32 nr32 = nr;
	__u32 *class = bpf_map_lookup_elem(&syscall_class, &nr32);
	if (!class || !*class || *class >= STEP_CLASSES)
		return 0;
	__u32 stage = ts->stage;
	if (stage >= STAGES)
		return 0;
	__u64 *addr = bpf_map_lookup_elem(&stage_step, &stage);
	if (!addr || !*addr)
		return 0;
	__u64 step;
	if (bpf_probe_read_user(&step, sizeof(step), (void *)*addr))
		return 0;
	__u32 key = stage * STEP_SLOTS + (__u32)(step % STEP_SLOTS);
	struct step_hist *h = bpf_map_lookup_elem(&step_hist, &key);
	if (!h) {
		count_lost(2);
		return 1;
	}
	__sync_fetch_and_add(&h->busy, 1);
	if (h->step == step) {
		__u32 b = bucket < STEP_BUCKETS ? bucket : STEP_BUCKETS - 1;
		__u32 i = *class * STEP_BUCKETS + b;
		if (i < STEP_CLASSES * STEP_BUCKETS)
			__sync_fetch_and_add(&h->counts[i], 1);
	} else {
		count_lost(2);
	}
	__sync_fetch_and_add(&h->busy, -1);
	return 1;
}

// sys_enter(struct pt_regs *regs, long id)
SEC("raw_tracepoint/sys_enter")
int slug_sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
	__u32 tid;
	if (!current_stage_thread(&tid))
		return 0;
	__u32 slot = SLOT(tid);
	struct syscall_start *s = bpf_map_lookup_elem(&in_syscall, &slot);
	if (s) {
		s->ns = bpf_ktime_get_ns();
		s->nr = ctx->args[1];
		s->tid = tid;
	}
	return 0;
}

// sys_exit(struct pt_regs *regs, long ret)
SEC("raw_tracepoint/sys_exit")
int slug_sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
	__u32 tid;
	struct thread_stage *ts = current_stage_thread(&tid);
	if (!ts)
		return 0;
	__u32 slot = SLOT(tid);
	struct syscall_start *s = bpf_map_lookup_elem(&in_syscall, &slot);
	if (!s || s->tid != tid)
		return 0;
	__u64 start = s->ns, nr = s->nr;
	s->tid = 0;
	__u64 dur = bpf_ktime_get_ns() - start;
	if (dur >= slow_syscall_ns) {
		emit(KIND_SYSCALL, tid, start, nr, ctx->args[1], dur);
		return 0;
	}
	__u16 bucket = log2_u64(dur);
	if (count_in_step(ts, nr, bucket))
		return 0;
	struct hist_key key = { .tid = tid, .nr = (__u16)nr, .bucket = bucket };
	__u64 *n = bpf_map_lookup_elem(&syscall_hist, &key);
	if (n) {
		__sync_fetch_and_add(n, 1);
	} else {
		__u64 one = 1;
		if (bpf_map_update_elem(&syscall_hist, &key, &one, BPF_NOEXIST)) {
			n = bpf_map_lookup_elem(&syscall_hist, &key);
			if (n)
				__sync_fetch_and_add(n, 1);
			else
				count_lost(1);
		}
	}
	count_lost(HIST_GENERATION);
	return 0;
}

// page_fault_user(unsigned long address, struct pt_regs *regs, unsigned long error_code), x86
SEC("raw_tracepoint/page_fault_user")
int slug_page_fault_user(struct bpf_raw_tracepoint_args *ctx)
{
	__u32 tid;
	if (!current_stage_thread(&tid))
		return 0;
	struct pt_regs *regs = (struct pt_regs *)ctx->args[1];
	emit(KIND_PAGE_FAULT, tid, bpf_ktime_get_ns(), ctx->args[0], BPF_CORE_READ(regs, ip),
	     ctx->args[2]);
	return 0;
}

// sched_migrate_task(struct task_struct *p, int dest_cpu)
SEC("raw_tracepoint/sched_migrate_task")
int slug_sched_migrate_task(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *p = (struct task_struct *)ctx->args[0];
	__u32 tid;
	if (!task_is_stage_thread(p, &tid))
		return 0;
	__u32 from;
	if (bpf_core_field_exists(p->cpu))
		from = BPF_CORE_READ(p, cpu);
	else
		from = BPF_CORE_READ(p, thread_info.cpu);
	emit(KIND_MIGRATION, tid, bpf_ktime_get_ns(), from, (__u32)ctx->args[1], 0);
	return 0;
}

static __always_inline int remember_socket(struct bpf_raw_tracepoint_args *ctx)
{
	__u32 tid;
	if (!current_stage_thread(&tid))
		return 0;
	__u64 sk = ctx->args[0];
	__u32 *seen = bpf_map_lookup_elem(&stage_sockets, &sk);
	if (!seen || *seen != tid)
		bpf_map_update_elem(&stage_sockets, &sk, &tid, BPF_ANY);
	return 0;
}

// sock_send_length(struct sock *sk, int ret, int flags), in the sender's context
SEC("raw_tracepoint/sock_send_length")
int slug_sock_send_length(struct bpf_raw_tracepoint_args *ctx)
{
	return remember_socket(ctx);
}

// sock_recv_length(struct sock *sk, int ret, int flags), in the receiver's context
SEC("raw_tracepoint/sock_recv_length")
int slug_sock_recv_length(struct bpf_raw_tracepoint_args *ctx)
{
	return remember_socket(ctx);
}

static __always_inline __u64 ports(struct sock *sk)
{
	__u16 dport = BPF_CORE_READ(sk, __sk_common.skc_dport);
	__u16 sport = BPF_CORE_READ(sk, __sk_common.skc_num);
	return ((__u64)sport << 16) | (__u16)((dport >> 8) | (dport << 8));
}

// tcp_retransmit_skb(const struct sock *sk, const struct sk_buff *skb, ...)
SEC("raw_tracepoint/tcp_retransmit_skb")
int slug_tcp_retransmit_skb(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 sk = ctx->args[0];
	__u32 *tid = bpf_map_lookup_elem(&stage_sockets, &sk);
	if (!tid)
		return 0;
	emit(KIND_TCP_RETRANSMIT, *tid, bpf_ktime_get_ns(), ports((struct sock *)sk), 0, 0);
	return 0;
}

// kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)
SEC("raw_tracepoint/kfree_skb")
int slug_kfree_skb(struct bpf_raw_tracepoint_args *ctx)
{
	struct sk_buff *skb = (struct sk_buff *)ctx->args[0];
	__u64 sk = (__u64)BPF_CORE_READ(skb, sk);
	if (!sk)
		return 0;
	__u32 *tid = bpf_map_lookup_elem(&stage_sockets, &sk);
	if (!tid)
		return 0;
	emit(KIND_TCP_DROP, *tid, bpf_ktime_get_ns(), ports((struct sock *)sk), ctx->args[2], 0);
	return 0;
}
