"""The four FedDG benchmarks as data: canonical domain order and class lists (docs/method.md §1.1), expected image
counts, and the archives the papers point to. `trip.data.datasets` registers them; nothing here runs.

Class lists are the sorted class-folder names (Python's case-sensitive sort, as torchvision's ImageFolder
and TRIP's `utils/config.get_classname` have them), so a label is an index into the list. The DomainNet
list equals TRIP's `get_classname('domain_net')` entry for entry.

Per-class counts are given where a public table of them sums exactly to the per-domain totals."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Archive:
    url: str
    checksum: str | None = None  # "sha256:<hex>" or "md5:<hex>"; None: no published value is known
    domains: tuple[str, ...] = ()  # domains it holds; () for a loose file placed in the data set folder

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
PACS_COUNTS = {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}
PACS_CLASS_COUNTS = {
    "art_painting": dict(zip(PACS_CLASSES, (379, 255, 285, 184, 201, 295, 449))),
    "cartoon": dict(zip(PACS_CLASSES, (389, 457, 346, 135, 324, 288, 405))),
    "photo": dict(zip(PACS_CLASSES, (189, 202, 182, 186, 199, 280, 432))),
    "sketch": dict(zip(PACS_CLASSES, (772, 740, 753, 608, 816, 80, 160))),
}
PACS_ARCHIVES = (Archive("https://wjdcloud.blob.core.windows.net/dataset/PACS.zip", domains=PACS_DOMAINS),)

VLCS_DOMAINS = ("Caltech101", "LabelMe", "SUN09", "VOC2007")
VLCS_CLASSES = ("bird", "car", "chair", "dog", "person")
VLCS_COUNTS = {"Caltech101": 1415, "LabelMe": 2656, "SUN09": 3282, "VOC2007": 3376}
VLCS_ARCHIVES = (Archive("https://wjdcloud.blob.core.windows.net/dataset/VLCS/VLCS.zip", domains=VLCS_DOMAINS),)

OFFICE_HOME_DOMAINS = ("Art", "Clipart", "Product", "Real_World")
OFFICE_HOME_ALIASES = {"Real_World": ("Real World",)}  # the original archive and DomainBed keep the space
OFFICE_HOME_CLASSES = (
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator", "Calendar", "Candles",
    "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp", "Drill", "Eraser", "Exit_Sign", "Fan",
    "File_Cabinet", "Flipflops", "Flowers", "Folder", "Fork", "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard",
    "Knives", "Lamp_Shade", "Laptop", "Marker", "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven",
    "Pan", "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin", "Radio", "Refrigerator", "Ruler",
    "Scissors", "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda", "Speaker", "Spoon", "TV", "Table",
    "Telephone", "ToothBrush", "Toys", "Trash_Can", "Webcam",
)
OFFICE_HOME_COUNTS = {"Art": 2427, "Clipart": 4365, "Product": 4439, "Real_World": 4357}
OFFICE_HOME_CLASS_COUNTS = {
    "Art": dict(zip(OFFICE_HOME_CLASSES, (
        74, 41, 27, 40, 75, 99, 40, 33, 20, 76, 69, 25, 44, 40, 40, 23, 15, 18, 21, 45,
        22, 46, 90, 20, 46, 40, 40, 79, 46, 18, 72, 49, 51, 20, 42, 32, 18, 49, 21, 20,
        19, 19, 20, 26, 19, 18, 24, 47, 49, 15, 20, 30, 42, 41, 46, 40, 20, 46, 40, 16,
        44, 43, 20, 21, 16))),
    "Clipart": dict(zip(OFFICE_HOME_CLASSES, (
        60, 56, 64, 98, 99, 99, 73, 46, 78, 99, 99, 40, 99, 64, 42, 41, 48, 40, 41, 50,
        40, 40, 99, 99, 61, 52, 99, 69, 40, 99, 53, 40, 99, 71, 99, 40, 76, 99, 83, 40,
        51, 40, 99, 99, 41, 87, 40, 46, 40, 67, 99, 75, 42, 42, 43, 61, 90, 60, 99, 80,
        99, 39, 99, 53, 40))),
    "Product": dict(zip(OFFICE_HOME_CLASSES, (
        79, 99, 62, 43, 44, 62, 47, 81, 81, 56, 99, 65, 96, 88, 75, 83, 67, 41, 67, 58,
        71, 99, 91, 90, 41, 67, 57, 90, 72, 99, 41, 54, 99, 56, 98, 72, 96, 41, 93, 68,
        70, 47, 60, 40, 38, 99, 43, 43, 59, 58, 99, 40, 49, 46, 99, 43, 99, 47, 76, 60,
        58, 42, 45, 93, 98))),
    "Real_World": dict(zip(OFFICE_HOME_CLASSES, (
        86, 99, 64, 83, 99, 78, 80, 73, 68, 99, 96, 65, 64, 76, 73, 62, 51, 43, 81, 60,
        58, 85, 75, 57, 36, 60, 52, 60, 72, 75, 83, 78, 67, 23, 71, 46, 60, 58, 68, 64,
        30, 68, 65, 59, 67, 52, 53, 66, 75, 41, 77, 51, 66, 77, 88, 63, 81, 54, 53, 59,
        82, 85, 67, 81, 49))),
}
OFFICE_HOME_ARCHIVES = (Archive("https://wjdcloud.blob.core.windows.net/dataset/OfficeHome.zip",
                                domains=OFFICE_HOME_DOMAINS),)

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_CLASSES = (
    "The_Eiffel_Tower", "The_Great_Wall_of_China", "The_Mona_Lisa", "aircraft_carrier", "airplane", "alarm_clock",
    "ambulance", "angel", "animal_migration", "ant", "anvil", "apple", "arm", "asparagus", "axe", "backpack",
    "banana", "bandage", "barn", "baseball", "baseball_bat", "basket", "basketball", "bat", "bathtub", "beach",
    "bear", "beard", "bed", "bee", "belt", "bench", "bicycle", "binoculars", "bird", "birthday_cake", "blackberry",
    "blueberry", "book", "boomerang", "bottlecap", "bowtie", "bracelet", "brain", "bread", "bridge", "broccoli",
    "broom", "bucket", "bulldozer", "bus", "bush", "butterfly", "cactus", "cake", "calculator", "calendar", "camel",
    "camera", "camouflage", "campfire", "candle", "cannon", "canoe", "car", "carrot", "castle", "cat",
    "ceiling_fan", "cell_phone", "cello", "chair", "chandelier", "church", "circle", "clarinet", "clock", "cloud",
    "coffee_cup", "compass", "computer", "cookie", "cooler", "couch", "cow", "crab", "crayon", "crocodile", "crown",
    "cruise_ship", "cup", "diamond", "dishwasher", "diving_board", "dog", "dolphin", "donut", "door", "dragon",
    "dresser", "drill", "drums", "duck", "dumbbell", "ear", "elbow", "elephant", "envelope", "eraser", "eye",
    "eyeglasses", "face", "fan", "feather", "fence", "finger", "fire_hydrant", "fireplace", "firetruck", "fish",
    "flamingo", "flashlight", "flip_flops", "floor_lamp", "flower", "flying_saucer", "foot", "fork", "frog",
    "frying_pan", "garden", "garden_hose", "giraffe", "goatee", "golf_club", "grapes", "grass", "guitar",
    "hamburger", "hammer", "hand", "harp", "hat", "headphones", "hedgehog", "helicopter", "helmet", "hexagon",
    "hockey_puck", "hockey_stick", "horse", "hospital", "hot_air_balloon", "hot_dog", "hot_tub", "hourglass",
    "house", "house_plant", "hurricane", "ice_cream", "jacket", "jail", "kangaroo", "key", "keyboard", "knee",
    "knife", "ladder", "lantern", "laptop", "leaf", "leg", "light_bulb", "lighter", "lighthouse", "lightning",
    "line", "lion", "lipstick", "lobster", "lollipop", "mailbox", "map", "marker", "matches", "megaphone",
    "mermaid", "microphone", "microwave", "monkey", "moon", "mosquito", "motorbike", "mountain", "mouse",
    "moustache", "mouth", "mug", "mushroom", "nail", "necklace", "nose", "ocean", "octagon", "octopus", "onion",
    "oven", "owl", "paint_can", "paintbrush", "palm_tree", "panda", "pants", "paper_clip", "parachute", "parrot",
    "passport", "peanut", "pear", "peas", "pencil", "penguin", "piano", "pickup_truck", "picture_frame", "pig",
    "pillow", "pineapple", "pizza", "pliers", "police_car", "pond", "pool", "popsicle", "postcard", "potato",
    "power_outlet", "purse", "rabbit", "raccoon", "radio", "rain", "rainbow", "rake", "remote_control",
    "rhinoceros", "rifle", "river", "roller_coaster", "rollerskates", "sailboat", "sandwich", "saw", "saxophone",
    "school_bus", "scissors", "scorpion", "screwdriver", "sea_turtle", "see_saw", "shark", "sheep", "shoe",
    "shorts", "shovel", "sink", "skateboard", "skull", "skyscraper", "sleeping_bag", "smiley_face", "snail",
    "snake", "snorkel", "snowflake", "snowman", "soccer_ball", "sock", "speedboat", "spider", "spoon",
    "spreadsheet", "square", "squiggle", "squirrel", "stairs", "star", "steak", "stereo", "stethoscope",
    "stitches", "stop_sign", "stove", "strawberry", "streetlight", "string_bean", "submarine", "suitcase", "sun",
    "swan", "sweater", "swing_set", "sword", "syringe", "t-shirt", "table", "teapot", "teddy-bear", "telephone",
    "television", "tennis_racquet", "tent", "tiger", "toaster", "toe", "toilet", "tooth", "toothbrush",
    "toothpaste", "tornado", "tractor", "traffic_light", "train", "tree", "triangle", "trombone", "truck",
    "trumpet", "umbrella", "underwear", "van", "vase", "violin", "washing_machine", "watermelon", "waterslide",
    "whale", "wheel", "windmill", "wine_bottle", "wine_glass", "wristwatch", "yoga", "zebra", "zigzag",
)
# The cleaned split files (train + test lines). The zips hold about 1.6 % more images (duplicates that the
# cleaned files, and DomainBed, leave out), so folder counts only match these with data.domainnet_splits.
DOMAINNET_COUNTS = {"clipart": 48129, "infograph": 51605, "painting": 72266, "quickdraw": 172500, "real": 172947,
                    "sketch": 69128}
_DN = "http://csr.bu.edu/ftp/visda/2019/multi-source/"
# MD5s as published in several public download scripts (they agree); clipart and painting sit under
# groundtruth/ because they were VisDA-2019 test domains whose labels came later.
DOMAINNET_ARCHIVES = (
    Archive(_DN + "groundtruth/clipart.zip", "md5:cd0d8f2d77a4e181449b78ed62bccf1e", ("clipart",)),
    Archive(_DN + "infograph.zip", "md5:720380b86f9e6ab4805bb38b6bd135f8", ("infograph",)),
    Archive(_DN + "groundtruth/painting.zip", "md5:1ae32cdb4f98fe7ab5eb0a351768abfd", ("painting",)),
    Archive(_DN + "quickdraw.zip", "md5:bdc1b6f09f277da1a263389efe0c7a66", ("quickdraw",)),
    Archive(_DN + "real.zip", "md5:dcc47055e8935767784b7162e7c7cca6", ("real",)),
    Archive(_DN + "sketch.zip", "md5:658d8009644040ff7ce30bb2e820850f", ("sketch",)),
    *(Archive(f"{_DN}domainnet/txt/{d}_{split}.txt") for d in DOMAINNET_DOMAINS for split in ("train", "test")),
)
