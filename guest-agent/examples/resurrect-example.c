/*
 * resurrect-example.c - a C program keeping its state in a resurrection region.
 *
 *   cc -I guest-agent/include guest-agent/examples/resurrect-example.c -lz -o resurrect-example
 *   resurrect-example              create, register, put records, wait (in a guest, as root)
 *   resurrect-example --file PATH  write the region to PATH instead (pfns 1000.., no xenstore):
 *                                  how the unit tests check C and Python agree
 */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "xenpbr-resurrect.h"

static int put_records(struct xpbr_region *r)
{
    char key[32], value[64];
    int i;
    for (i = 0; i < 40; i++) {
        int n = snprintf(key, sizeof(key), "key-%d", i % 10);
        int m = snprintf(value, sizeof(value), "value-%d", i);
        if (xpbr_put(r, key, (uint16_t)n, value, (uint32_t)m) < 0)
            return 1;
    }
    return xpbr_delete(r, "key-3", 5) < 0;
}

static int to_file(const char *path)
{
    struct xpbr_region r;
    uint64_t pfns[XPBR_MAX_PAGES];
    uint32_t i;
    FILE *f;
    for (i = 0; i < XPBR_MAX_PAGES; i++)
        pfns[i] = 1000 + 3 * i;
    if (xpbr_region_init(&r, "c-example", 3 * XPBR_PAGE_SIZE, 128, 7, pfns, 0) != 0
        || put_records(&r) != 0)
        return 1;
    f = fopen(path, "wb");
    if (!f || fwrite(r.base, XPBR_PAGE_SIZE, r.page_count, f) != r.page_count)
        return 1;
    fclose(f);
    xpbr_region_free(&r);
    return 0;
}

int main(int argc, char **argv)
{
    struct xpbr_region r;
    int err;
    if (argc == 3 && strcmp(argv[1], "--file") == 0)
        return to_file(argv[2]);
    if ((err = xpbr_region_create(&r, "c-example", 64 * 1024, 256)) != 0) {
        fprintf(stderr, "resurrect-example: cannot create the region: %s\n", strerror(-err));
        return 1;
    }
    if ((err = xpbr_region_register(&r)) != 0 || put_records(&r) != 0) {
        fprintf(stderr, "resurrect-example: cannot register or put\n");
        return 1;
    }
    printf("resurrect-example: %u pages registered; waiting\n", r.page_count);
    fflush(stdout);
    for (;;)
        pause();
}
