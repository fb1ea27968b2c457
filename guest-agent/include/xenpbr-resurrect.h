/*
 * xenpbr-resurrect.h - resurrection regions for C programs (header-only).
 *
 * The layout and commit rule of docs/specs/resurrection-region.md (format version 1), the
 * same as the Python library xenpbr_agent.resurrect: a region of locked anonymous memory
 * (header page, directory pages listing every page's pfn, then record slots), records
 * committed with plain stores (no system call), CRC-32 from zlib. Link with -lz.
 *
 *   struct xpbr_region r;
 *   if (xpbr_region_create(&r, "kv", 1 << 20, 256) == 0 && xpbr_region_register(&r) == 0)
 *       xpbr_put(&r, "k", 1, "v", 1);
 *
 * Creating a region needs root or CAP_SYS_ADMIN (pfns from /proc/self/pagemap).
 * xpbr_region_register writes data/xenpbr/resurrect/<app> with the xenstore-write command
 * (xen-utils / xenstore-utils in the guest). Functions return 0 or a negative errno.
 */
#ifndef XENPBR_RESURRECT_H
#define XENPBR_RESURRECT_H

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define XPBR_PAGE_SIZE 4096u
#define XPBR_HEADER_SIZE 128u
#define XPBR_VERSION 1u
#define XPBR_MIN_PAGES 3u
#define XPBR_MAX_PAGES 16384u
#define XPBR_PFNS_PER_DIR_PAGE 512u
#define XPBR_RECORD_HEADER 24u
#define XPBR_MAX_KEY 255u
#define XPBR_FLAG_TOMBSTONE 1u
#define XPBR_APP_MAX 31u

struct xpbr_region {
    unsigned char *base;     /* page_count pages */
    uint32_t page_count, dir_pages, slot_size, slot_count;
    uint64_t generation, next_seq;
    char app[XPBR_APP_MAX + 1];
    uint64_t *pfns;          /* page_count entries */
    uint8_t *slot_used;      /* per slot: 1 if it holds a key's current version */
};

static inline uint32_t xpbr_crc(const void *data, size_t len)
{
    return (uint32_t)crc32(0L, (const Bytef *)data, (uInt)len);
}

static inline void xpbr_put16(unsigned char *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void xpbr_put32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void xpbr_put64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint16_t xpbr_get16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }

static inline int xpbr_app_ok(const char *app)
{
    size_t n = strlen(app), i;
    if (n < 1 || n > XPBR_APP_MAX)
        return 0;
    for (i = 0; i < n; i++) {
        char c = app[i];
        int alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        if (!alnum && (i == 0 || (c != '_' && c != '-')))
            return 0;
    }
    return 1;
}

/* Pages for a record area of at least area_bytes. */
static inline uint32_t xpbr_page_count(size_t area_bytes)
{
    uint32_t area = (uint32_t)((area_bytes + XPBR_PAGE_SIZE - 1) / XPBR_PAGE_SIZE), pages;
    if (area == 0)
        area = 1;
    pages = 2 + area;
    while (pages != 1 + (pages + XPBR_PFNS_PER_DIR_PAGE - 1) / XPBR_PFNS_PER_DIR_PAGE + area)
        pages = 1 + (pages + XPBR_PFNS_PER_DIR_PAGE - 1) / XPBR_PFNS_PER_DIR_PAGE + area;
    return pages;
}

/* The pfns of the region's pages from /proc/self/pagemap (root or CAP_SYS_ADMIN). */
static inline int xpbr_read_pfns(struct xpbr_region *r)
{
    int fd = open("/proc/self/pagemap", O_RDONLY);
    uint32_t i;
    if (fd < 0)
        return -errno;
    for (i = 0; i < r->page_count; i++) {
        uint64_t entry;
        off_t off = (off_t)((uintptr_t)(r->base + (size_t)i * XPBR_PAGE_SIZE) / XPBR_PAGE_SIZE) * 8;
        if (pread(fd, &entry, 8, off) != 8 || !(entry >> 63) || !(entry & ((1ULL << 55) - 1))) {
            close(fd);
            return -EPERM; /* hidden pfns: not root / no CAP_SYS_ADMIN */
        }
        r->pfns[i] = entry & ((1ULL << 55) - 1);
    }
    close(fd);
    return 0;
}

/* Header and directory, given r->pfns. */
static inline void xpbr_lay_out(struct xpbr_region *r)
{
    unsigned char *h = r->base;
    uint32_t i;
    memset(h, 0, (size_t)(1 + r->dir_pages) * XPBR_PAGE_SIZE);
    memcpy(h, "XPBRRGN1", 8);
    xpbr_put16(h + 8, XPBR_VERSION);
    xpbr_put16(h + 10, XPBR_HEADER_SIZE);
    xpbr_put32(h + 12, r->page_count);
    xpbr_put64(h + 16, r->generation);
    memcpy(h + 24, r->app, strlen(r->app));
    xpbr_put32(h + 56, r->dir_pages);
    xpbr_put32(h + 60, r->slot_size);
    xpbr_put32(h + 64, r->slot_count);
    xpbr_put32(h + 124, xpbr_crc(h, 124));
    for (i = 0; i < r->page_count; i++)
        xpbr_put64(h + XPBR_PAGE_SIZE + (size_t)i * 8, r->pfns[i]);
}

static inline void xpbr_region_free(struct xpbr_region *r)
{
    if (r->base && r->base != MAP_FAILED)
        munmap(r->base, (size_t)r->page_count * XPBR_PAGE_SIZE);
    free(r->pfns);
    free(r->slot_used);
    memset(r, 0, sizeof(*r));
}

/* Map, lock and lay out a region. pfns may be NULL: read them from pagemap. */
static inline int xpbr_region_init(struct xpbr_region *r, const char *app, size_t area_bytes,
                                   uint32_t slot_size, uint64_t generation, const uint64_t *pfns,
                                   int lock)
{
    size_t bytes;
    int err = 0;
    memset(r, 0, sizeof(*r));
    if (!xpbr_app_ok(app) || slot_size % 64 || slot_size < 64 || slot_size > 65536)
        return -EINVAL;
    r->page_count = xpbr_page_count(area_bytes);
    if (r->page_count > XPBR_MAX_PAGES)
        return -E2BIG;
    r->dir_pages = (r->page_count + XPBR_PFNS_PER_DIR_PAGE - 1) / XPBR_PFNS_PER_DIR_PAGE;
    r->slot_size = slot_size;
    r->slot_count = (uint32_t)(((size_t)(r->page_count - 1 - r->dir_pages) * XPBR_PAGE_SIZE) / slot_size);
    r->generation = generation;
    r->next_seq = 1;
    strcpy(r->app, app);
    bytes = (size_t)r->page_count * XPBR_PAGE_SIZE;
    r->base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r->base == MAP_FAILED) {
        r->base = NULL;
        return -errno;
    }
    r->pfns = calloc(r->page_count, sizeof(uint64_t));
    r->slot_used = calloc(r->slot_count, 1);
    if (!r->pfns || !r->slot_used)
        err = -ENOMEM;
    else if (lock && mlock(r->base, bytes) != 0)
        err = -errno;
    else if (pfns)
        memcpy(r->pfns, pfns, r->page_count * sizeof(uint64_t));
    else
        err = xpbr_read_pfns(r);
    if (err != 0) {
        xpbr_region_free(r);
        return err;
    }
    xpbr_lay_out(r);
    return 0;
}

static inline int xpbr_region_create(struct xpbr_region *r, const char *app, size_t area_bytes,
                                     uint32_t slot_size)
{
    FILE *f = fopen("/proc/sys/vm/compact_unevictable_allowed", "w");
    if (f) { /* keep locked pages where they are; the CRCs catch any that move anyway */
        fputs("0\n", f);
        fclose(f);
    }
    return xpbr_region_init(r, app, area_bytes, slot_size, (uint64_t)time(NULL), NULL, 1);
}

/* data/xenpbr/resurrect/<app> = "1 <generation> <page_count> <header_pfn> <dir_pfns>". */
static inline int xpbr_registration(const struct xpbr_region *r, char *out, size_t size)
{
    uint32_t i;
    int n = snprintf(out, size, "1 %llu %u %llu ", (unsigned long long)r->generation,
                     r->page_count, (unsigned long long)r->pfns[0]);
    for (i = 0; i < r->dir_pages && n > 0 && (size_t)n < size; i++)
        n += snprintf(out + n, size - (size_t)n, i ? ",%llu" : "%llu",
                      (unsigned long long)r->pfns[1 + i]);
    return (n > 0 && (size_t)n < size) ? 0 : -ENOSPC;
}

static inline int xpbr_region_register(const struct xpbr_region *r)
{
    char value[1900], cmd[2100];
    if (xpbr_registration(r, value, sizeof(value)) != 0)
        return -ENOSPC;
    snprintf(cmd, sizeof(cmd), "xenstore-write data/xenpbr/resurrect/%s '%s'", r->app, value);
    return system(cmd) == 0 ? 0 : -EIO;
}

static inline unsigned char *xpbr_slot(const struct xpbr_region *r, uint32_t slot)
{
    return r->base + (size_t)(1 + r->dir_pages) * XPBR_PAGE_SIZE + (size_t)slot * r->slot_size;
}

/* The slot holding key's current version, or -1. A linear scan keeps the header small;
 * a real program keeps its own index (key -> slot) in ordinary memory. */
static inline int64_t xpbr_find(const struct xpbr_region *r, const void *key, uint16_t key_len)
{
    uint32_t i;
    for (i = 0; i < r->slot_count; i++) {
        const unsigned char *s = xpbr_slot(r, i);
        if (r->slot_used[i] && xpbr_get16(s + 16) == key_len &&
            memcmp(s + XPBR_RECORD_HEADER, key, key_len) == 0)
            return i;
    }
    return -1;
}

/* Commit a version of key (tombstone: deleted) into a free slot, magic last; then free the
 * old slot. Stores only: no system call. Returns the seq (> 0) or a negative errno. */
static inline int64_t xpbr_commit(struct xpbr_region *r, const void *key, uint16_t key_len,
                                  const void *value, uint32_t value_len, int tombstone)
{
    uint32_t i, end = XPBR_RECORD_HEADER + key_len + value_len, free_slots = 0;
    int64_t old = xpbr_find(r, key, key_len), slot = -1;
    unsigned char *s;
    uint64_t seq = r->next_seq;
    if (key_len < 1 || key_len > XPBR_MAX_KEY || end > r->slot_size)
        return -EINVAL;
    for (i = 0; i < r->slot_count; i++)
        if (!r->slot_used[i]) {
            if (slot < 0)
                slot = i;
            free_slots++;
        }
    if (free_slots < (old < 0 ? 2u : 1u)) /* one slot stays spare for updates */
        return -ENOSPC;
    s = xpbr_slot(r, (uint32_t)slot);
    xpbr_put64(s + 8, seq);
    xpbr_put16(s + 16, key_len);
    xpbr_put16(s + 18, tombstone ? XPBR_FLAG_TOMBSTONE : 0);
    xpbr_put32(s + 20, value_len);
    memcpy(s + XPBR_RECORD_HEADER, key, key_len);
    memcpy(s + XPBR_RECORD_HEADER + key_len, value, value_len);
    xpbr_put32(s + 4, xpbr_crc(s + 8, end - 8));
    __atomic_thread_fence(__ATOMIC_RELEASE); /* everything above before the magic */
    memcpy(s, "XREC", 4);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    r->slot_used[slot] = 1;
    r->next_seq = seq + 1;
    if (old >= 0) {
        memset(xpbr_slot(r, (uint32_t)old), 0, 4);
        r->slot_used[old] = 0;
    }
    return (int64_t)seq;
}

static inline int64_t xpbr_put(struct xpbr_region *r, const void *key, uint16_t key_len,
                               const void *value, uint32_t value_len)
{
    return xpbr_commit(r, key, key_len, value, value_len, 0);
}

static inline int64_t xpbr_delete(struct xpbr_region *r, const void *key, uint16_t key_len)
{
    return xpbr_commit(r, key, key_len, "", 0, 1);
}

#endif /* XENPBR_RESURRECT_H */
