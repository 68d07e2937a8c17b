"""Names and cities for the sample members: Chinese and English names, and the cities they live in.

Plain data for ``engine.data.sampledata``; the shares are what the generator draws with, so
changing a list changes the sample workspace a seed produces.
"""

# (surname, pinyin); common surnames first, drawn with a Zipf-like weight
CN_SURNAMES = [
    ("王", "wang"), ("李", "li"), ("张", "zhang"), ("刘", "liu"), ("陈", "chen"), ("杨", "yang"),
    ("黄", "huang"), ("赵", "zhao"), ("吴", "wu"), ("周", "zhou"), ("徐", "xu"), ("孙", "sun"),
    ("马", "ma"), ("朱", "zhu"), ("胡", "hu"), ("郭", "guo"), ("何", "he"), ("林", "lin"),
    ("罗", "luo"), ("高", "gao"), ("郑", "zheng"), ("梁", "liang"), ("谢", "xie"), ("宋", "song"),
    ("唐", "tang"), ("许", "xu"), ("韩", "han"), ("冯", "feng"), ("邓", "deng"), ("曹", "cao"),
    ("彭", "peng"), ("曾", "zeng"), ("肖", "xiao"), ("田", "tian"), ("董", "dong"), ("潘", "pan"),
    ("袁", "yuan"), ("蔡", "cai"), ("蒋", "jiang"), ("余", "yu"), ("杜", "du"), ("叶", "ye"),
    ("程", "cheng"), ("魏", "wei"), ("苏", "su"), ("吕", "lv"), ("丁", "ding"), ("沈", "shen"),
    ("欧阳", "ouyang"), ("司马", "sima"),
]
CN_GIVEN_FEMALE = [
    ("芳", "fang"), ("娜", "na"), ("敏", "min"), ("静", "jing"), ("丽", "li"), ("艳", "yan"),
    ("娟", "juan"), ("霞", "xia"), ("婷", "ting"), ("颖", "ying"), ("秀英", "xiuying"),
    ("桂英", "guiying"), ("子涵", "zihan"), ("欣怡", "xinyi"), ("梓萱", "zixuan"), ("思涵", "sihan"),
    ("雨桐", "yutong"), ("一诺", "yinuo"), ("诗涵", "shihan"), ("佳怡", "jiayi"), ("梦琪", "mengqi"),
    ("雅婷", "yating"), ("晓燕", "xiaoyan"), ("丽华", "lihua"), ("海燕", "haiyan"), ("慧敏", "huimin"),
]
CN_GIVEN_MALE = [
    ("伟", "wei"), ("强", "qiang"), ("磊", "lei"), ("军", "jun"), ("洋", "yang"), ("勇", "yong"),
    ("杰", "jie"), ("涛", "tao"), ("明", "ming"), ("超", "chao"), ("刚", "gang"), ("鹏", "peng"),
    ("斌", "bin"), ("浩然", "haoran"), ("宇轩", "yuxuan"), ("俊杰", "junjie"), ("子轩", "zixuan"),
    ("志强", "zhiqiang"), ("建华", "jianhua"), ("晓明", "xiaoming"), ("文博", "wenbo"),
    ("明轩", "mingxuan"), ("天佑", "tianyou"), ("建国", "jianguo"), ("家豪", "jiahao"),
]
EN_FIRST_FEMALE = [
    "Emma", "Olivia", "Sophia", "Charlotte", "Amelia", "Isla", "Grace", "Emily", "Hannah", "Chloe",
    "Lucy", "Mia", "Ava", "Ella", "Zoe", "Sarah", "Laura", "Megan", "Jessica", "Rachel",
]
EN_FIRST_MALE = [
    "James", "Oliver", "Jack", "Harry", "George", "Noah", "William", "Thomas", "Daniel", "Michael",
    "David", "Samuel", "Joseph", "Benjamin", "Henry", "Lucas", "Ethan", "Ryan", "Adam", "Matthew",
]
EN_LAST = [
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Taylor", "Davies", "Wilson", "Evans", "Thomas",
    "Roberts", "Walker", "Wright", "Thompson", "White", "Hughes", "Edwards", "Green", "Hall", "Wood",
    "Harris", "Clarke", "Miller", "Moore", "Martin", "Lee", "Baker", "Carter", "Turner", "Cooper",
]

# city, timezone, share of members, (locales, their shares)
CITIES = [
    ("上海", "Asia/Shanghai", 0.25, (["zh-CN", "zh", "en-US"], [0.92, 0.03, 0.05])),
    ("北京", "Asia/Shanghai", 0.20, (["zh-CN", "zh", "en-US"], [0.93, 0.03, 0.04])),
    ("广州", "Asia/Shanghai", 0.11, (["zh-CN", "zh", "en-US"], [0.95, 0.03, 0.02])),
    ("深圳", "Asia/Shanghai", 0.13, (["zh-CN", "zh", "en-US"], [0.94, 0.03, 0.03])),
    ("杭州", "Asia/Shanghai", 0.11, (["zh-CN", "zh", "en-US"], [0.96, 0.02, 0.02])),
    ("成都", "Asia/Shanghai", 0.10, (["zh-CN", "zh", "en-US"], [0.97, 0.02, 0.01])),
    ("London", "Europe/London", 0.05, (["en-GB", "zh-CN"], [0.80, 0.20])),
    ("New York", "America/New_York", 0.05, (["en-US", "zh-CN"], [0.80, 0.20])),
]
