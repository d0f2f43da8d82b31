// SPDX-License-Identifier: GPL-2.0
/*
 * Test-only module of `tests/debug/run --self-test`: it proves that the debug
 * lane's kernel-log scanner (tests/debug/scan-kmsg) fails on each kind of report.
 * Every load, with mode=NAME, makes the debug kernel print one report on purpose,
 * without harming the kernel, then fails (-EAGAIN) so that it can be loaded
 * again with the next mode. The lane itself never loads it.
 *
 * Order matters: a KASAN report turns lockdep off, so run lockdep first and
 * kasan last.
 */
#include <linux/compiler.h>
#include <linux/kernel.h>
#include <linux/list.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/preempt.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/timer.h>

static char *mode = "warn";
module_param(mode, charp, 0444);
MODULE_PARM_DESC(mode, "lockdep, sleep, warn, ubsan, list, odebug or kasan");

static DEFINE_MUTEX(st_a);
static DEFINE_MUTEX(st_b);

/* A then B, later B then A: lockdep reports the possible ABBA deadlock. */
static void st_lockdep(void)
{
	mutex_lock(&st_a);
	mutex_lock(&st_b);
	mutex_unlock(&st_b);
	mutex_unlock(&st_a);

	mutex_lock(&st_b);
	mutex_lock(&st_a);
	mutex_unlock(&st_a);
	mutex_unlock(&st_b);
}

/* "BUG: sleeping function called from invalid context" (nothing sleeps). */
static void st_sleep(void)
{
	preempt_disable();
	might_sleep();
	preempt_enable();
}

static void st_warn(void)
{
	WARN(1, "debug_selftest: a WARN on purpose\n");
}

/* "UBSAN: shift-out-of-bounds" */
static void st_ubsan(void)
{
	unsigned int shift = 40;
	int v = 1;

	OPTIMIZER_HIDE_VAR(shift);
	v <<= shift;
	pr_info("debug_selftest: 1 << %u = %d\n", shift, v);
}

/* "list_add corruption": the check refuses the add and the list stays intact. */
static void st_list(void)
{
	LIST_HEAD(head);
	struct list_head a, b;

	list_add(&a, &head);
	a.prev = &b;		/* head.next->prev no longer points to head */
	list_add(&b, &head);
	a.prev = &head;
	list_del(&a);
}

static void st_timer_fn(struct timer_list *t)
{
}

/* "ODEBUG: init active": a pending timer initialised again (ODEBUG fixes it up). */
static void st_odebug(void)
{
	struct timer_list t;

	timer_setup_on_stack(&t, st_timer_fn, 0);
	mod_timer(&t, jiffies + 100 * HZ);
	timer_setup_on_stack(&t, st_timer_fn, 0);
	timer_delete_sync(&t);
	timer_destroy_on_stack(&t);
}

/* "BUG: KASAN: slab-out-of-bounds": one byte read past a kmalloc'ed object. */
static void st_kasan(void)
{
	size_t n = 123;
	char *p = kmalloc(n, GFP_KERNEL);

	if (!p)
		return;
	OPTIMIZER_HIDE_VAR(n);
	pr_info("debug_selftest: read past the end: %d\n", ((volatile char *)p)[n]);
	kfree(p);
}

static const struct {
	const char *name;
	void (*fn)(void);
} st_modes[] = {
	{ "lockdep", st_lockdep },
	{ "sleep", st_sleep },
	{ "warn", st_warn },
	{ "ubsan", st_ubsan },
	{ "list", st_list },
	{ "odebug", st_odebug },
	{ "kasan", st_kasan },
};

static int __init debug_selftest_init(void)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(st_modes); i++) {
		if (strcmp(mode, st_modes[i].name))
			continue;
		pr_info("debug_selftest: mode %s: a report follows on purpose\n", mode);
		st_modes[i].fn();
		pr_info("debug_selftest: mode %s: done\n", mode);
		return -EAGAIN;	/* never stays loaded */
	}
	pr_err("debug_selftest: unknown mode %s\n", mode);
	return -EINVAL;
}
module_init(debug_selftest_init);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("virtio-dmaheap debug lane: reports on purpose (self-test only)");
