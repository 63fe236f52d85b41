"""JSON Schemas the structured-output tests (and benchmarks/structured_output_bench.py) use:
nested objects, arrays, enums, bounded numbers, required and optional properties, `$ref`,
`anyOf`, `const`, nullable and string-length constraints.

Strings, arrays and numbers are bounded (maxLength, maxItems, maximum) so that even a tiny
random model, which has no reason ever to close a string, finishes within max_tokens.
"""

from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 8}
SHORT = {"type": "string", "maxLength": 6}

SCHEMAS: dict[str, dict] = {
    "flat_required": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
    },
    "optional_props": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": SHORT, "c": {"type": "null"}},
        "required": ["a"],
    },
    "enum_string": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
    },
    "enum_mixed": {"enum": ["on", "off", 1, 2, None, True]},
    "const": {
        "type": "object",
        "properties": {"version": {"const": 2}, "kind": {"const": "event"}},
        "required": ["version", "kind"],
    },
    "bounded_integer": {"type": "integer", "minimum": -50, "maximum": 50},
    "exclusive_bounds": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
    "bounded_number": {
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["x"],
    },
    "array_of_ints": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": 1,
        "maxItems": 4,
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}, "tag": SHORT},
            "required": ["id", "tag"],
        },
        "maxItems": 3,
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": NAME,
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": NAME,
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
                        "required": ["city", "zip"],
                    },
                },
                "required": ["name", "address"],
            }
        },
        "required": ["user"],
    },
    "ref_defs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9},
                },
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
    "ref_definitions_array": {
        "definitions": {"item": {"type": "string", "enum": ["a", "b", "c"]}},
        "type": "array",
        "items": {"$ref": "#/definitions/item"},
        "maxItems": 5,
    },
    "any_of": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 5}, SHORT]}
        },
        "required": ["value"],
    },
    "nullable": {
        "type": "object",
        "properties": {"note": {"type": ["string", "null"], "maxLength": 5}},
        "required": ["note"],
    },
    "pattern_string": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "string_length": {"type": "string", "minLength": 2, "maxLength": 4},
    "boolean": {"type": "boolean"},
    "tuple_prefix_items": {
        "type": "array",
        "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}],
        "items": False,
    },
    "matrix": {
        "type": "array",
        "items": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 2,
            "maxItems": 2,
        },
        "minItems": 2,
        "maxItems": 2,
    },
    "tool_arguments": {
        "type": "object",
        "properties": {
            "location": NAME,
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["location", "unit"],
        "additionalProperties": False,
    },
    "deep_nesting": {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {
                            "c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}
                        },
                        "required": ["c"],
                    }
                },
                "required": ["b"],
            }
        },
        "required": ["a"],
    },
}
