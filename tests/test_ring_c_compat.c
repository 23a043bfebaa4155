/*
 * ringcheck: the C side of tests/test_ring_c_compat.py.
 *
 * Built against the installed Xen public headers, it reads a ring page that
 * the Python code wrote, prints what the real ring.h macros and structs see,
 * and (for some modes) writes responses or requests back for Python to read.
 * Output is one record per line, fields separated by spaces.
 *
 *   ringcheck layout
 *   ringcheck blk-back    FILE START   consume requests, answer each one
 *   ringcheck blk-front   FILE         init a ring and queue fixed requests
 *   ringcheck nettx-back  FILE START
 *   ringcheck netrx-back  FILE START
 *   ringcheck cons-back   FILE         read "out", write "in"
 */
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef mb
#define mb()  __sync_synchronize()
#define rmb() __sync_synchronize()
#define wmb() __sync_synchronize()
#endif
#include <xen/io/ring.h>
#include <xen/io/blkif.h>
#include <xen/io/netif.h>
#include <xen/io/console.h>

static unsigned char page[65536];
static size_t page_len;

static void load(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    page_len = fread(page, 1, sizeof(page), f);
    fclose(f);
}

static void save(const char *path)
{
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(2); }
    if (fwrite(page, 1, page_len, f) != page_len) { perror("write"); exit(2); }
    fclose(f);
}

#define HDR(s) printf("hdr %u %u %u %u\n", (s)->req_prod, (s)->req_event, \
                      (s)->rsp_prod, (s)->rsp_event)

static int layout(void)
{
    printf("blkif_request %zu\n", sizeof(struct blkif_request));
    printf("blkif_response %zu\n", sizeof(struct blkif_response));
    printf("blkif_request_discard %zu\n", sizeof(struct blkif_request_discard));
    printf("blkif_request_indirect %zu\n", sizeof(struct blkif_request_indirect));
    printf("blkif_entry %zu\n", sizeof(union blkif_sring_entry));
    printf("netif_tx_entry %zu\n", sizeof(union netif_tx_sring_entry));
    printf("netif_rx_entry %zu\n", sizeof(union netif_rx_sring_entry));
    printf("ring_offset %zu\n", offsetof(struct blkif_sring, ring));
    printf("xencons_interface %zu\n", sizeof(struct xencons_interface));
    printf("xencons_in_cons %zu\n", offsetof(struct xencons_interface, in_cons));
    printf("xencons_out_prod %zu\n", offsetof(struct xencons_interface, out_prod));
    for (int order = 0; order <= 4; order++) {
        size_t sz = 4096u << order;
        printf("size blkif %zu %u\n", sz, (unsigned)__CONST_RING_SIZE(blkif, sz));
        printf("size netif_tx %zu %u\n", sz, (unsigned)__CONST_RING_SIZE(netif_tx, sz));
        printf("size netif_rx %zu %u\n", sz, (unsigned)__CONST_RING_SIZE(netif_rx, sz));
    }
    return 0;
}

static int blk_back(const char *path, RING_IDX start)
{
    blkif_back_ring_t r;
    blkif_sring_t *s = (blkif_sring_t *)page;
    int notify, more;

    load(path);
    BACK_RING_ATTACH(&r, s, start, page_len);
    printf("size %u\n", RING_SIZE(&r));
    HDR(s);
    while (RING_HAS_UNCONSUMED_REQUESTS(&r)) {
        struct blkif_request req;
        RING_COPY_REQUEST(&r, r.req_cons, &req);
        r.req_cons++;
        if (req.operation == BLKIF_OP_DISCARD) {
            struct blkif_request_discard *d = (void *)&req;
            printf("discard %u %u %llu %llu %llu\n", d->flag, d->handle,
                   (unsigned long long)d->id, (unsigned long long)d->sector_number,
                   (unsigned long long)d->nr_sectors);
        } else if (req.operation == BLKIF_OP_INDIRECT) {
            struct blkif_request_indirect *in = (void *)&req;
            printf("indirect %u %u %llu %llu %u", in->indirect_op, in->nr_segments,
                   (unsigned long long)in->id, (unsigned long long)in->sector_number,
                   in->handle);
            for (int i = 0; i < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; i++)
                printf(" %u", in->indirect_grefs[i]);
            printf("\n");
        } else {
            printf("req %u %u %u %llu %llu", req.operation, req.nr_segments, req.handle,
                   (unsigned long long)req.id, (unsigned long long)req.sector_number);
            for (int i = 0; i < req.nr_segments && i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++)
                printf(" %u:%u:%u", req.seg[i].gref, req.seg[i].first_sect,
                       req.seg[i].last_sect);
            printf("\n");
        }
        blkif_response_t *rsp = RING_GET_RESPONSE(&r, r.rsp_prod_pvt);
        rsp->id = req.id;
        rsp->operation = req.operation;
        rsp->status = (int16_t)((req.id % 3) - 2);   /* -2, -1, 0 in turn */
        r.rsp_prod_pvt++;
    }
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&r, notify);
    printf("notify %d\n", notify);
    RING_FINAL_CHECK_FOR_REQUESTS(&r, more);
    printf("more %d\n", more);
    HDR(s);
    save(path);
    return 0;
}

static int blk_front(const char *path)
{
    blkif_front_ring_t r;
    blkif_sring_t *s = (blkif_sring_t *)page;
    int notify;

    page_len = 4096;
    memset(page, 0xAA, page_len);    /* prove SHARED_RING_INIT clears what it must */
    XEN_FRONT_RING_INIT(&r, s, page_len);

    blkif_request_t *req = RING_GET_REQUEST(&r, r.req_prod_pvt++);
    memset(req, 0, sizeof(*req));
    req->operation = BLKIF_OP_WRITE;
    req->nr_segments = 3;
    req->handle = 51712;
    req->id = 0x1122334455667788ULL;
    req->sector_number = 0xFEDCBA9876543210ULL;
    for (int i = 0; i < 3; i++) {
        req->seg[i].gref = 1000 + i;
        req->seg[i].first_sect = i;
        req->seg[i].last_sect = 7 - i;
    }
    blkif_request_discard_t *d = (void *)RING_GET_REQUEST(&r, r.req_prod_pvt++);
    memset(d, 0, sizeof(*req));
    d->operation = BLKIF_OP_DISCARD;
    d->flag = BLKIF_DISCARD_SECURE;
    d->handle = 7;
    d->id = 42;
    d->sector_number = 1 << 20;
    d->nr_sectors = 2048;
    blkif_request_indirect_t *in = (void *)RING_GET_REQUEST(&r, r.req_prod_pvt++);
    memset(in, 0, sizeof(*req));
    in->operation = BLKIF_OP_INDIRECT;
    in->indirect_op = BLKIF_OP_READ;
    in->nr_segments = 600;
    in->id = 43;
    in->sector_number = 99;
    in->handle = 5;
    in->indirect_grefs[0] = 77;
    in->indirect_grefs[1] = 78;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&r, notify);
    printf("notify %d\n", notify);
    save(path);
    return 0;
}

static int nettx_back(const char *path, RING_IDX start)
{
    netif_tx_back_ring_t r;
    netif_tx_sring_t *s = (netif_tx_sring_t *)page;
    int notify;

    load(path);
    BACK_RING_ATTACH(&r, s, start, page_len);
    printf("size %u\n", RING_SIZE(&r));
    HDR(s);
    while (RING_HAS_UNCONSUMED_REQUESTS(&r)) {
        netif_tx_request_t req;
        RING_COPY_REQUEST(&r, r.req_cons, &req);
        r.req_cons++;
        printf("tx %u %u %u %u %u\n", req.gref, req.offset, req.flags, req.id, req.size);
        netif_tx_response_t *rsp = RING_GET_RESPONSE(&r, r.rsp_prod_pvt++);
        rsp->id = req.id;
        rsp->status = (req.id & 1) ? NETIF_RSP_DROPPED : NETIF_RSP_OKAY;
    }
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&r, notify);
    printf("notify %d\n", notify);
    HDR(s);
    save(path);
    return 0;
}

static int netrx_back(const char *path, RING_IDX start)
{
    netif_rx_back_ring_t r;
    netif_rx_sring_t *s = (netif_rx_sring_t *)page;
    int notify;

    load(path);
    BACK_RING_ATTACH(&r, s, start, page_len);
    printf("size %u\n", RING_SIZE(&r));
    while (RING_HAS_UNCONSUMED_REQUESTS(&r)) {
        netif_rx_request_t req;
        RING_COPY_REQUEST(&r, r.req_cons, &req);
        r.req_cons++;
        printf("rx %u %u\n", req.id, req.gref);
        netif_rx_response_t *rsp = RING_GET_RESPONSE(&r, r.rsp_prod_pvt++);
        rsp->id = req.id;
        rsp->offset = 16;
        rsp->flags = NETRXF_data_validated | NETRXF_more_data;
        rsp->status = (int16_t)(req.id == 3 ? NETIF_RSP_ERROR : 1500 + req.id);
    }
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&r, notify);
    printf("notify %d\n", notify);
    save(path);
    return 0;
}

static int cons_back(const char *path)
{
    struct xencons_interface *intf = (void *)page;
    static const char msg[] = "typed on the C side";

    load(path);
    printf("idx %u %u %u %u\n", intf->in_cons, intf->in_prod, intf->out_cons, intf->out_prod);
    printf("out ");
    for (XENCONS_RING_IDX i = intf->out_cons; i != intf->out_prod; i++)
        printf("%02x", (unsigned char)intf->out[MASK_XENCONS_IDX(i, intf->out)]);
    printf("\n");
    intf->out_cons = intf->out_prod;
    for (size_t i = 0; i < sizeof(msg) - 1; i++)
        intf->in[MASK_XENCONS_IDX(intf->in_prod + i, intf->in)] = msg[i];
    intf->in_prod += sizeof(msg) - 1;
    save(path);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "layout")) return layout();
    if (argc < 3) { fprintf(stderr, "usage: ringcheck MODE FILE [START]\n"); return 2; }
    RING_IDX start = argc > 3 ? (RING_IDX)strtoul(argv[3], NULL, 0) : 0;
    if (!strcmp(argv[1], "blk-back")) return blk_back(argv[2], start);
    if (!strcmp(argv[1], "blk-front")) return blk_front(argv[2]);
    if (!strcmp(argv[1], "nettx-back")) return nettx_back(argv[2], start);
    if (!strcmp(argv[1], "netrx-back")) return netrx_back(argv[2], start);
    if (!strcmp(argv[1], "cons-back")) return cons_back(argv[2]);
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}
