/* float32 vectors as the text of a real[], for every answer the proxy gives: each element with nine
 * significant digits, which PostgreSQL's float4 input reads back to the same bits, written as %.9g
 * would (positional from 1e-4 to 1e9, trailing zeros dropped).
 *
 * Why C: Python's formatting of 384 floats took ~0.1 ms a vector, on the way of every answer (a
 * one-row INSERT waits for it, and a back-fill's answers compete with the engine for the same cores).
 *
 * The nine digits are rint(|x| * 10^(8-e)), in double: its rounding error (below 1e-15 relative) may
 * move the last digit by one where printf would not, which leaves the decimal within 1e-8 relative of
 * x, less than half a float32's spacing (over 2.9e-8 relative): it still reads back as x. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* 10^k for k in [POW_MIN, POW_MAX]: the scales a float32's nine digits need (1e-45 to 3.4e38). */
#define POW_MIN (-40)
#define POW_MAX 56
static double powers[POW_MAX - POW_MIN + 1];

/* The longest element: "-0.000123456789" or "-1.23456789e-45" (15 characters), and a comma. */
#define ELEMENT_MAX 16

static uint32_t nine_digits(double magnitude, int *exponent) {
    int e = (int)floor(log10(magnitude));
    double digits = rint(magnitude * powers[8 - e - POW_MIN]);
    if (digits >= 1e9) { /* log10 was one short next to a power of ten */
        e += 1;
        digits = rint(magnitude * powers[8 - e - POW_MIN]);
    } else if (digits < 1e8) {
        e -= 1;
        digits = rint(magnitude * powers[8 - e - POW_MIN]);
    }
    *exponent = e;
    return (uint32_t)digits;
}

/* Writes one element at `out`; returns its length. */
static int write_element(float value, char *out) {
    char *p = out;
    if (isnan(value)) {
        memcpy(out, "NaN", 3);
        return 3;
    }
    if (signbit(value))
        *p++ = '-';
    if (isinf(value)) {
        memcpy(p, "Infinity", 8);
        return (int)(p - out) + 8;
    }
    if (value == 0) {
        *p++ = '0';
        return (int)(p - out);
    }
    int e;
    uint32_t m = nine_digits(fabs((double)value), &e);
    char digits[9];
    for (int i = 8; i >= 0; i--) {
        digits[i] = (char)('0' + m % 10);
        m /= 10;
    }
    int count = 9;
    while (digits[count - 1] == '0') /* the first digit is never 0 */
        count--;
    if (e >= -4 && e < 9) {
        if (e < 0) {
            *p++ = '0';
            *p++ = '.';
            for (int i = 0; i < -e - 1; i++)
                *p++ = '0';
            memcpy(p, digits, count);
            p += count;
        } else {
            int whole = e + 1;
            memcpy(p, digits, whole);
            p += whole;
            if (count > whole) {
                *p++ = '.';
                memcpy(p, digits + whole, count - whole);
                p += count - whole;
            }
        }
    } else {
        *p++ = digits[0];
        if (count > 1) {
            *p++ = '.';
            memcpy(p, digits + 1, count - 1);
            p += count - 1;
        }
        *p++ = 'e';
        *p++ = e < 0 ? '-' : '+';
        int size = e < 0 ? -e : e;
        *p++ = (char)('0' + size / 10);
        *p++ = (char)('0' + size % 10);
    }
    return (int)(p - out);
}

static PyObject *py_real_array_text(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    if (view.itemsize != 4 || (view.format != NULL && strcmp(view.format, "f") != 0 && strcmp(view.format, "<f") != 0
                               && strcmp(view.format, "=f") != 0)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "real_array_text takes a contiguous buffer of float32");
        return NULL;
    }
    Py_ssize_t count = view.len / 4;
    char *text = PyMem_Malloc((size_t)count * ELEMENT_MAX + 2);
    if (text == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    const float *values = view.buf;
    char *p = text;
    *p++ = '{';
    for (Py_ssize_t i = 0; i < count; i++) {
        if (i)
            *p++ = ',';
        p += write_element(values[i], p);
    }
    *p++ = '}';
    PyBuffer_Release(&view);
    PyObject *result = PyUnicode_DecodeASCII(text, p - text, NULL);
    PyMem_Free(text);
    return result;
}

static PyMethodDef methods[] = {
    {"real_array_text", py_real_array_text, METH_O,
     "real_array_text(float32 buffer): the text of a real[] that reads back as the same floats."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_floattext", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__floattext(void) {
    char power[8];
    for (int k = POW_MIN; k <= POW_MAX; k++) { /* strtod rounds correctly */
        snprintf(power, sizeof power, "1e%d", k);
        powers[k - POW_MIN] = strtod(power, NULL);
    }
    return PyModule_Create(&module);
}
